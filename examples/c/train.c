/*
 * Fine-tunes a model with LoRA through the C API: load, attach adapters, train on a tiny
 * hand-made token batch with a progress callback, save the adapter in PEFT's format, reload it,
 * and generate a few tokens with it.
 *
 *   cc -I include examples/c/train.c -L target/release -lfinetune -o train
 *   ./train <model_dir> <adapter_out_dir>
 *
 * Exits with 0 when training lowered the loss and every call succeeded.
 */
#include "finetune.h"

#include <stdio.h>
#include <stdlib.h>

#define SEQ 16
#define STEPS 30

static int check(ft_status status, const char *what) {
    if (status != FT_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, ft_status_name(status), ft_last_error());
        return 0;
    }
    return 1;
}

struct progress {
    float first_loss;
    float last_loss;
};

static int32_t on_step(const ft_step_stats *stats, void *user) {
    struct progress *p = (struct progress *)user;
    if (stats->step == 1) p->first_loss = stats->loss;
    p->last_loss = stats->loss;
    if (stats->step % 10 == 0) printf("step %llu  loss %.4f\n", (unsigned long long)stats->step, stats->loss);
    return 0; /* non-zero would cancel training */
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <model_dir> <adapter_out_dir>\n", argv[0]);
        return 2;
    }
    if (ft_abi_version() != FT_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header ABI %u\n", ft_abi_version(), FT_ABI_VERSION);
        return 1;
    }
    int ok = 0;
    ft_model *model = NULL;
    ft_trainer *trainer = NULL, *reloaded = NULL;

    ft_model_params mp = ft_model_default_params();
    mp.device = "cpu";
    if (!check(ft_model_load(argv[1], &mp, &model), "ft_model_load")) goto done;
    ft_model_info info;
    if (!check(ft_model_get_info(model, &info), "ft_model_get_info")) goto done;
    printf("loaded %s: %llu layers, vocab %llu\n", argv[1], (unsigned long long)info.num_layers,
           (unsigned long long)info.vocab_size);

    ft_lora_params lp = ft_lora_default_params();
    lp.rank = 8;
    lp.alpha = 16.0f;
    ft_train_params tp = ft_train_default_params();
    tp.learning_rate = 1e-2f;
    tp.total_steps = STEPS;
    if (!check(ft_trainer_new(model, &lp, &tp, &trainer), "ft_trainer_new")) goto done;

    /* One row counting upwards; the model learns to continue the count. */
    int32_t ids[SEQ], labels[SEQ];
    for (int i = 0; i < SEQ; i++) {
        ids[i] = (int32_t)((3 + i) % info.vocab_size);
        labels[i] = i + 1 < SEQ ? (int32_t)((4 + i) % info.vocab_size) : FT_IGNORE_LABEL;
    }
    ft_batch batch = {ids, labels, NULL, NULL, 1, SEQ};
    struct progress prog = {0};
    if (!check(ft_trainer_train(trainer, &batch, 1, STEPS, on_step, &prog), "ft_trainer_train")) goto done;
    printf("loss %.4f -> %.4f\n", prog.first_loss, prog.last_loss);

    if (!check(ft_trainer_save_adapter(trainer, argv[2]), "ft_trainer_save_adapter")) goto done;
    printf("saved adapter to %s\n", argv[2]);

    if (!check(ft_trainer_load_adapter(model, argv[2], NULL, &reloaded), "ft_trainer_load_adapter")) goto done;
    int32_t prompt[3] = {ids[0], ids[1], ids[2]};
    int32_t out[8];
    size_t n_out = 0;
    if (!check(ft_model_generate(model, reloaded, prompt, 3, 8, -1, out, &n_out), "ft_model_generate")) goto done;
    printf("generated:");
    for (size_t i = 0; i < n_out; i++) printf(" %d", out[i]);
    printf("\n");
    ok = prog.last_loss < prog.first_loss;
    if (!ok) fprintf(stderr, "the loss did not fall\n");

done:
    ft_trainer_free(reloaded);
    ft_trainer_free(trainer);
    ft_model_free(model);
    return ok ? 0 : 1;
}
