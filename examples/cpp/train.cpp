// Fine-tunes a model with LoRA from C++ through finetune.hpp: load, attach adapters, train a few
// steps on a tiny counting sequence, save the adapter, reload it and generate a line.
//
//   c++ -std=c++17 -I include -I examples/cpp examples/cpp/train.cpp -L target/release -lfinetune -o train
//   ./train <model_dir> <adapter_out_dir>
#include "finetune.hpp"

#include <cstdio>

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s <model_dir> <adapter_out_dir>\n", argv[0]);
        return 2;
    }
    try {
        ft_model_params mp = ft_model_default_params();
        mp.device = "cpu";
        auto model = finetune::Model::load(argv[1], mp);

        ft_lora_params lora = ft_lora_default_params();
        lora.rank = 8;
        lora.alpha = 16.0f;
        ft_train_params opts = ft_train_default_params();
        opts.learning_rate = 1e-2f;
        opts.total_steps = 30;
        auto trainer = finetune::Trainer::create(model, lora, opts);

        // One row counting upwards; the model learns to continue the count.
        finetune::Batch batch;
        for (int32_t i = 0; i < 16; i++) {
            batch.input_ids.push_back(3 + i);
            batch.labels.push_back(i + 1 < 16 ? 4 + i : FT_IGNORE_LABEL);
        }
        float first = 0, last = 0;
        trainer.train({batch}, 30, [&](const ft_step_stats &s) {
            if (s.step == 1) first = s.loss;
            last = s.loss;
            if (s.step % 10 == 0) std::printf("step %llu  loss %.4f\n", (unsigned long long)s.step, s.loss);
            return true;  // false would cancel
        });
        std::printf("loss %.4f -> %.4f\n", first, last);

        trainer.save_adapter(argv[2]);
        std::printf("saved adapter to %s\n", argv[2]);
        auto reloaded = finetune::Trainer::load_adapter(model, argv[2]);
        std::printf("generated:");
        for (int32_t t : model.generate({3, 4, 5}, 8, &reloaded)) std::printf(" %d", t);
        std::printf("\n");
        return last < first ? 0 : 1;
    } catch (const finetune::Error &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
