// A small RAII layer over libfinetune's C API for C++17: handles owned by std::unique_ptr,
// statuses thrown as finetune::Error with the library's message, progress as a std::function.
#pragma once

#include "finetune.h"

#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace finetune {

/// A failed call: the status and ft_last_error()'s message.
class Error : public std::runtime_error {
public:
    Error(const char *op, ft_status status)
        : std::runtime_error(std::string(op) + ": " + ft_status_name(status) + ": " + ft_last_error()),
          status_(status) {}
    ft_status status() const { return status_; }

private:
    ft_status status_;
};

inline void check(const char *op, ft_status status) {
    if (status != FT_OK) throw Error(op, status);
}

/// A batch whose arrays it owns; batch() views them as the C struct.
struct Batch {
    std::vector<int32_t> input_ids, labels;
    uint32_t batch_size = 1, seq_len = 0;
    ft_batch view() const {
        return ft_batch{input_ids.data(), labels.data(), nullptr, nullptr, batch_size,
                        seq_len ? seq_len : static_cast<uint32_t>(input_ids.size() / batch_size)};
    }
};

class Trainer;

class Model {
public:
    static Model load(const std::string &path, const ft_model_params &params = ft_model_default_params()) {
        ft_model *m = nullptr;
        check("ft_model_load", ft_model_load(path.c_str(), &params, &m));
        return Model(m);
    }
    ft_model_info info() const {
        ft_model_info i;
        check("ft_model_get_info", ft_model_get_info(get(), &i));
        return i;
    }
    std::vector<int32_t> generate(const std::vector<int32_t> &prompt, size_t max_new, const Trainer *adapter = nullptr,
                                  int32_t stop = -1) const;
    ft_model *get() const { return h_.get(); }

private:
    explicit Model(ft_model *m) : h_(m, &ft_model_free) {}
    std::unique_ptr<ft_model, void (*)(ft_model *)> h_;
};

class Trainer {
public:
    /// Return false from the progress function to stop training (throws Error FT_ERR_CANCELLED).
    using Progress = std::function<bool(const ft_step_stats &)>;

    static Trainer create(const Model &model, const ft_lora_params &lora = ft_lora_default_params(),
                          const ft_train_params &train = ft_train_default_params()) {
        ft_trainer *t = nullptr;
        check("ft_trainer_new", ft_trainer_new(model.get(), &lora, &train, &t));
        return Trainer(t);
    }
    static Trainer load_adapter(const Model &model, const std::string &dir) {
        ft_trainer *t = nullptr;
        check("ft_trainer_load_adapter", ft_trainer_load_adapter(model.get(), dir.c_str(), nullptr, &t));
        return Trainer(t);
    }
    void train(const std::vector<Batch> &batches, uint64_t steps, Progress progress = {}) {
        std::vector<ft_batch> views;
        for (const auto &b : batches) views.push_back(b.view());
        Call call{progress, nullptr};
        ft_status st = ft_trainer_train(get(), views.data(), views.size(), steps, progress ? &on_step : nullptr, &call);
        if (call.error) std::rethrow_exception(call.error);
        check("ft_trainer_train", st);
    }
    float eval_loss(const Batch &b) const {
        ft_batch v = b.view();
        float loss = 0;
        check("ft_trainer_eval_loss", ft_trainer_eval_loss(get(), &v, &loss));
        return loss;
    }
    void save_adapter(const std::string &dir) const {
        check("ft_trainer_save_adapter", ft_trainer_save_adapter(get(), dir.c_str()));
    }
    ft_trainer *get() const { return h_.get(); }

private:
    struct Call {
        Progress &progress;
        std::exception_ptr error;
    };
    // No C++ exception may unwind through the library: keep it and stop training.
    static int32_t on_step(const ft_step_stats *stats, void *user) {
        auto *call = static_cast<Call *>(user);
        try {
            return call->progress(*stats) ? 0 : 1;
        } catch (...) {
            call->error = std::current_exception();
            return 1;
        }
    }
    explicit Trainer(ft_trainer *t) : h_(t, &ft_trainer_free) {}
    std::unique_ptr<ft_trainer, void (*)(ft_trainer *)> h_;
};

inline std::vector<int32_t> Model::generate(const std::vector<int32_t> &prompt, size_t max_new,
                                            const Trainer *adapter, int32_t stop) const {
    std::vector<int32_t> out(max_new ? max_new : 1);
    size_t n = 0;
    check("ft_model_generate", ft_model_generate(get(), adapter ? adapter->get() : nullptr, prompt.data(),
                                                 prompt.size(), max_new, stop, out.data(), &n));
    out.resize(n);
    return out;
}

}  // namespace finetune
