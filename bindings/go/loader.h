/* Resolves libfinetune's entry points at run time (dlopen), so that the Go package builds without
 * the library present and finds it through FINETUNE_LIB or the places listed in lib.go. */
#ifndef FINETUNE_GO_LOADER_H
#define FINETUNE_GO_LOADER_H

#include "finetune.h"

#include <stdint.h>

/* Opens `path`, checks that its ft_abi_version() is this header's FT_ABI_VERSION, and resolves every
 * entry point. Returns 0 on success; otherwise writes the reason to `err` (room for `err_len` bytes)
 * and returns -1. Safe to call again after a failure. */
int ftgo_open(const char *path, char *err, size_t err_len);

uint32_t ftgo_abi_version(void);
const char *ftgo_version(void);
const char *ftgo_last_error(void);
const char *ftgo_status_name(ft_status s);
ft_model_params ftgo_model_default_params(void);
ft_lora_params ftgo_lora_default_params(void);
ft_train_params ftgo_train_default_params(void);
ft_status ftgo_model_load(const char *path, const ft_model_params *p, ft_model **out);
ft_status ftgo_model_random(const char *shape, uint64_t seed, const ft_model_params *p, ft_model **out);
ft_status ftgo_model_get_info(const ft_model *m, ft_model_info *out);
ft_status ftgo_model_save(const ft_model *m, const char *dir, int32_t dtype);
ft_status ftgo_model_generate(const ft_model *m, const ft_trainer *t, const int32_t *prompt, size_t n_prompt,
                              size_t max_new, int32_t stop, int32_t *out, size_t *n_out);
void ftgo_model_free(ft_model *m);
ft_status ftgo_trainer_new(const ft_model *m, const ft_lora_params *l, const ft_train_params *t, ft_trainer **out);
ft_status ftgo_trainer_load_adapter(const ft_model *m, const char *dir, const ft_train_params *t, ft_trainer **out);
ft_status ftgo_trainer_step(ft_trainer *t, const ft_batch *b, size_t n, ft_step_stats *out);
/* ft_trainer_train with the Go progress hook; `handle` is a cgo.Handle (0: no progress hook). */
ft_status ftgo_trainer_train(ft_trainer *t, const ft_batch *b, size_t n, uint64_t steps, uintptr_t handle);
ft_status ftgo_trainer_eval_loss(const ft_trainer *t, const ft_batch *b, float *out);
ft_status ftgo_trainer_save_adapter(const ft_trainer *t, const char *dir);
ft_status ftgo_trainer_export_merged(const ft_trainer *t, const char *dir, int32_t dtype);
void ftgo_trainer_free(ft_trainer *t);
ft_status ftgo_nccl_unique_id(uint8_t *out, size_t out_len);
ft_bench_params ftgo_bench_default_params(void);
ft_status ftgo_bench(const ft_bench_params *p, char **json_out);
void ftgo_string_free(char *s);

#endif
