/*
 * Trains one LoRA adapter with several processes on one host, one GPU each, as one
 * data-parallel group over NCCL: rank 0 makes the group's unique id and hands it to the other
 * ranks through pipes (any transport would do: a file, an environment variable, an RPC); every
 * rank builds the same global batch, takes its own rows, and the library sums the gradients, so
 * the adapters stay identical on every rank and equal one trainer's on the whole batch. Only
 * rank 0 saves the adapter.
 *
 *   cc -I include examples/c/data_parallel.c -L target/release -lfinetune -o data_parallel
 *   ./data_parallel [ranks (2)] [adapter_out_dir (dp_adapter)] [kill_rank]
 *
 * With kill_rank, that rank exits abruptly after the first step: the others must then fail with
 * FT_ERR_COLLECTIVE within the group's timeout (10 s here) instead of hanging.
 * Exits with 0 when every rank finished (or, with kill_rank, when the survivors failed as
 * expected).
 */
#define _POSIX_C_SOURCE 200809L
#include "finetune.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define ROWS 4
#define SEQ 32
#define STEPS 8
#define MAX_RANKS 16

static int check(ft_status status, int rank, const char *what) {
    if (status != FT_OK) {
        fprintf(stderr, "rank %d: %s failed: %s: %s\n", rank, what, ft_status_name(status),
                ft_last_error());
        return 0;
    }
    return 1;
}

/* Writes or reads all `n` bytes of a pipe. */
static int move_all(int fd, uint8_t *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t k = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
        if (k <= 0) return 0;
        done += (size_t)k;
    }
    return 1;
}

/* One rank's whole life; returns its exit status. */
static int run_rank(int rank, int world, int pipes[][2], const char *adapter_dir, int kill_rank) {
    uint8_t id[FT_NCCL_UNIQUE_ID_BYTES];
    if (rank == 0) {
        if (!check(ft_nccl_unique_id(id, sizeof id), rank, "ft_nccl_unique_id")) return 1;
        for (int r = 1; r < world; r++)
            if (!move_all(pipes[r][1], id, sizeof id, 1)) return 1;
    } else if (!move_all(pipes[rank][0], id, sizeof id, 0)) {
        fprintf(stderr, "rank %d: no unique id from rank 0\n", rank);
        return 1;
    }

    char device[32];
    snprintf(device, sizeof device, "cuda:%d", rank);
    ft_model_params mp = ft_model_default_params();
    mp.device = device;
    mp.world_size = (uint32_t)world;
    mp.rank = (uint32_t)rank;
    mp.nccl_unique_id = id;
    mp.collective_timeout_ms = 10000;
    ft_model *model = NULL;
    ft_trainer *trainer = NULL;
    int status = 1;
    if (!check(ft_model_random("tiny", 7, &mp, &model), rank, "ft_model_random")) goto done;
    ft_lora_params lp = ft_lora_default_params();
    ft_train_params tp = ft_train_default_params();
    tp.learning_rate = 1e-2f;
    if (!check(ft_trainer_new(model, &lp, &tp, &trainer), rank, "ft_trainer_new")) goto done;

    /* The same global batch on every rank; this rank's share is rows [first, end). */
    static int32_t ids[ROWS * SEQ], labels[ROWS * SEQ];
    for (int t = 0; t < ROWS * SEQ; t++) ids[t] = (t * 7 + t / SEQ) % 64;
    for (int t = 0; t < ROWS * SEQ; t++) labels[t] = (t % SEQ == SEQ - 1) ? FT_IGNORE_LABEL : ids[t + 1];
    int first = rank * ROWS / world, end = (rank + 1) * ROWS / world;
    ft_batch mine = {ids + first * SEQ, labels + first * SEQ, NULL, NULL, (uint32_t)(end - first), SEQ};

    float first_loss = 0, last_loss = 0;
    for (int step = 1; step <= STEPS; step++) {
        ft_step_stats stats;
        /* A rank with no rows still takes part in every step. */
        ft_status st = ft_trainer_step(trainer, &mine, end > first ? 1 : 0, &stats);
        if (st == FT_ERR_COLLECTIVE && kill_rank >= 0) {
            printf("rank %d: the group failed as expected: %s\n", rank, ft_last_error());
            status = 3;
            goto done;
        }
        if (!check(st, rank, "ft_trainer_step")) goto done;
        if (step == 1) first_loss = stats.loss;
        last_loss = stats.loss;
        if (rank == 0)
            printf("step %d  loss %.4f  tokens %llu\n", step, stats.loss,
                   (unsigned long long)stats.tokens);
        if (rank == kill_rank) {
            printf("rank %d: exiting without a word\n", rank);
            fflush(stdout);
            _exit(4);
        }
    }
    if (!(last_loss < first_loss)) {
        fprintf(stderr, "rank %d: loss did not fall (%f -> %f)\n", rank, first_loss, last_loss);
        goto done;
    }
    if (rank == 0) {
        if (!check(ft_trainer_save_adapter(trainer, adapter_dir), rank, "ft_trainer_save_adapter"))
            goto done;
        printf("saved adapter to %s\n", adapter_dir);
    }
    status = 0;
done:
    ft_trainer_free(trainer);
    ft_model_free(model);
    return status;
}

int main(int argc, char **argv) {
    int world = argc > 1 ? atoi(argv[1]) : 2;
    const char *adapter_dir = argc > 2 ? argv[2] : "dp_adapter";
    int kill_rank = argc > 3 ? atoi(argv[3]) : -1;
    if (world < 1 || world > MAX_RANKS) {
        fprintf(stderr, "ranks must be 1..%d\n", MAX_RANKS);
        return 2;
    }
    if (ft_abi_version() != FT_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header ABI %u\n", ft_abi_version(), FT_ABI_VERSION);
        return 1;
    }
    /* The parent only forks and waits: it makes no CUDA or NCCL call. */
    int pipes[MAX_RANKS][2];
    for (int r = 0; r < world; r++)
        if (pipe(pipes[r]) != 0) return 1;
    pid_t pids[MAX_RANKS];
    for (int r = 0; r < world; r++) {
        pids[r] = fork();
        if (pids[r] < 0) return 1;
        if (pids[r] == 0) {
            int code = run_rank(r, world, pipes, adapter_dir, kill_rank);
            fflush(NULL); /* _exit skips stdio's buffers */
            _exit(code);
        }
    }
    int failed = 0;
    for (int r = 0; r < world; r++) {
        int ws = 0;
        waitpid(pids[r], &ws, 0);
        int code = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128;
        printf("rank %d exited with %d\n", r, code);
        if (kill_rank < 0) failed |= code != 0;
        /* With a rank killed: it exits 4, every other rank reports the group's failure (3). */
        else failed |= code != (r == kill_rank ? 4 : 3);
    }
    return failed;
}
