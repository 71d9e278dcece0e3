#include "loader.h"
#include "_cgo_export.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static struct {
    uint32_t (*abi_version)(void);
    const char *(*version)(void);
    const char *(*last_error)(void);
    const char *(*status_name)(ft_status);
    ft_model_params (*model_default_params)(void);
    ft_lora_params (*lora_default_params)(void);
    ft_train_params (*train_default_params)(void);
    ft_status (*model_load)(const char *, const ft_model_params *, ft_model **);
    ft_status (*model_random)(const char *, uint64_t, const ft_model_params *, ft_model **);
    ft_status (*model_get_info)(const ft_model *, ft_model_info *);
    ft_status (*model_save)(const ft_model *, const char *, int32_t);
    ft_status (*model_generate)(const ft_model *, const ft_trainer *, const int32_t *, size_t, size_t, int32_t,
                                int32_t *, size_t *);
    void (*model_free)(ft_model *);
    ft_status (*trainer_new)(const ft_model *, const ft_lora_params *, const ft_train_params *, ft_trainer **);
    ft_status (*trainer_load_adapter)(const ft_model *, const char *, const ft_train_params *, ft_trainer **);
    ft_status (*trainer_step)(ft_trainer *, const ft_batch *, size_t, ft_step_stats *);
    ft_status (*trainer_train)(ft_trainer *, const ft_batch *, size_t, uint64_t, ft_progress_fn, void *);
    ft_status (*trainer_eval_loss)(const ft_trainer *, const ft_batch *, float *);
    ft_status (*trainer_save_adapter)(const ft_trainer *, const char *);
    ft_status (*trainer_export_merged)(const ft_trainer *, const char *, int32_t);
    void (*trainer_free)(ft_trainer *);
    ft_status (*nccl_unique_id)(uint8_t *, size_t);
    ft_bench_params (*bench_default_params)(void);
    ft_status (*bench)(const ft_bench_params *, char **);
    void (*string_free)(char *);
} fn;

#define RESOLVE(field, name)                                                          \
    do {                                                                              \
        *(void **)(&fn.field) = dlsym(lib, name);                                     \
        if (!fn.field) {                                                              \
            snprintf(err, err_len, "%s: symbol %s is missing (a different library?)", \
                     path, name);                                                     \
            dlclose(lib);                                                             \
            return -1;                                                                \
        }                                                                             \
    } while (0)

int ftgo_open(const char *path, char *err, size_t err_len) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *why = dlerror();
        snprintf(err, err_len, "%s", why ? why : "dlopen failed");
        return -1;
    }
    RESOLVE(abi_version, "ft_abi_version");
    /* Before the other symbols: a library of another ABI may lack some of them, and its version
     * is the clearer message. */
    if (fn.abi_version() != FT_ABI_VERSION) {
        snprintf(err, err_len, "%s has C ABI version %u, this package needs %d", path,
                 (unsigned)fn.abi_version(), FT_ABI_VERSION);
        dlclose(lib);
        return -1;
    }
    RESOLVE(version, "ft_version");
    RESOLVE(last_error, "ft_last_error");
    RESOLVE(status_name, "ft_status_name");
    RESOLVE(model_default_params, "ft_model_default_params");
    RESOLVE(lora_default_params, "ft_lora_default_params");
    RESOLVE(train_default_params, "ft_train_default_params");
    RESOLVE(model_load, "ft_model_load");
    RESOLVE(model_random, "ft_model_random");
    RESOLVE(model_get_info, "ft_model_get_info");
    RESOLVE(model_save, "ft_model_save");
    RESOLVE(model_generate, "ft_model_generate");
    RESOLVE(model_free, "ft_model_free");
    RESOLVE(trainer_new, "ft_trainer_new");
    RESOLVE(trainer_load_adapter, "ft_trainer_load_adapter");
    RESOLVE(trainer_step, "ft_trainer_step");
    RESOLVE(trainer_train, "ft_trainer_train");
    RESOLVE(trainer_eval_loss, "ft_trainer_eval_loss");
    RESOLVE(trainer_save_adapter, "ft_trainer_save_adapter");
    RESOLVE(trainer_export_merged, "ft_trainer_export_merged");
    RESOLVE(trainer_free, "ft_trainer_free");
    RESOLVE(nccl_unique_id, "ft_nccl_unique_id");
    RESOLVE(bench_default_params, "ft_bench_default_params");
    RESOLVE(bench, "ft_bench");
    RESOLVE(string_free, "ft_string_free");
    return 0;
}

uint32_t ftgo_abi_version(void) { return fn.abi_version(); }
const char *ftgo_version(void) { return fn.version(); }
const char *ftgo_last_error(void) { return fn.last_error(); }
const char *ftgo_status_name(ft_status s) { return fn.status_name(s); }
ft_model_params ftgo_model_default_params(void) { return fn.model_default_params(); }
ft_lora_params ftgo_lora_default_params(void) { return fn.lora_default_params(); }
ft_train_params ftgo_train_default_params(void) { return fn.train_default_params(); }

ft_status ftgo_model_load(const char *path, const ft_model_params *p, ft_model **out) {
    return fn.model_load(path, p, out);
}
ft_status ftgo_model_random(const char *shape, uint64_t seed, const ft_model_params *p, ft_model **out) {
    return fn.model_random(shape, seed, p, out);
}
ft_status ftgo_model_get_info(const ft_model *m, ft_model_info *out) { return fn.model_get_info(m, out); }
ft_status ftgo_model_save(const ft_model *m, const char *dir, int32_t dtype) {
    return fn.model_save(m, dir, dtype);
}
ft_status ftgo_model_generate(const ft_model *m, const ft_trainer *t, const int32_t *prompt, size_t n_prompt,
                              size_t max_new, int32_t stop, int32_t *out, size_t *n_out) {
    return fn.model_generate(m, t, prompt, n_prompt, max_new, stop, out, n_out);
}
void ftgo_model_free(ft_model *m) { fn.model_free(m); }

ft_status ftgo_trainer_new(const ft_model *m, const ft_lora_params *l, const ft_train_params *t, ft_trainer **out) {
    return fn.trainer_new(m, l, t, out);
}
ft_status ftgo_trainer_load_adapter(const ft_model *m, const char *dir, const ft_train_params *t, ft_trainer **out) {
    return fn.trainer_load_adapter(m, dir, t, out);
}
ft_status ftgo_trainer_step(ft_trainer *t, const ft_batch *b, size_t n, ft_step_stats *out) {
    return fn.trainer_step(t, b, n, out);
}

static int32_t progress_trampoline(const ft_step_stats *stats, void *user) {
    return ftgoProgress((ft_step_stats *)stats, (uintptr_t)user);
}

ft_status ftgo_trainer_train(ft_trainer *t, const ft_batch *b, size_t n, uint64_t steps, uintptr_t handle) {
    return fn.trainer_train(t, b, n, steps, handle ? progress_trampoline : NULL, (void *)handle);
}
ft_status ftgo_trainer_eval_loss(const ft_trainer *t, const ft_batch *b, float *out) {
    return fn.trainer_eval_loss(t, b, out);
}
ft_status ftgo_trainer_save_adapter(const ft_trainer *t, const char *dir) { return fn.trainer_save_adapter(t, dir); }
ft_status ftgo_trainer_export_merged(const ft_trainer *t, const char *dir, int32_t dtype) {
    return fn.trainer_export_merged(t, dir, dtype);
}
void ftgo_trainer_free(ft_trainer *t) { fn.trainer_free(t); }

ft_status ftgo_nccl_unique_id(uint8_t *out, size_t out_len) { return fn.nccl_unique_id(out, out_len); }
ft_bench_params ftgo_bench_default_params(void) { return fn.bench_default_params(); }
ft_status ftgo_bench(const ft_bench_params *p, char **json_out) { return fn.bench(p, json_out); }
void ftgo_string_free(char *s) { fn.string_free(s); }
