package finetune

/*
#include <stdlib.h>
#include "loader.h"
*/
import "C"

import (
	"fmt"
	"math"
	"unsafe"
)

// BenchOptions is what Bench measures: the options of `finetune bench`. Start from
// DefaultBenchOptions.
type BenchOptions struct {
	// A named shape with random weights: "smollm2-135m", "llama3.2-1b", "llama3-8b",
	// "mistral-7b", "qwen2.5-7b", "gemma-7b", or "tiny" (two layers, hidden size 32).
	Model string
	// "lora" or "qlora" (frozen projection matrices in NF4); "" means "lora".
	Mode string
	// Rows per step and GPU, tokens per row, LoRA rank (alpha equals it) and timed steps
	// (after the untimed warm-up: one step, two where the second records the pass on a GPU);
	// each at least 1.
	Batch, Seq, Rank, Steps uint32
	// Recompute each layer in the backward pass instead of keeping its activations.
	Checkpointing bool
	// CPU worker threads; 0 means one per core.
	Threads int
	// "auto", "cpu", "cuda:N", "cuda:0,cuda:1" or "cuda:all" (each GPU takes Batch rows);
	// "" means "auto".
	Device string
	// Cap on the device memory held, in MiB (GPU only); 0 means none.
	MaxDeviceMemoryMiB uint64
	// Keep the saved layer inputs in pinned host memory (GPU only), as
	// TrainOptions.OffloadActivations.
	OffloadActivations bool
	// Keep the LM head in pinned host memory instead of device memory (GPU only), as
	// ModelOptions.LmHeadInHost.
	LmHeadInHost bool
	// Decoder layers kept in pinned host memory (GPU only), as
	// ModelOptions.LayersInHost; 0 means none.
	LayersInHost int
	// Layers that keep their MLP's gate and up products, as TrainOptions.KeptMlpLayers.
	KeptMlpLayers uint32
}

// DefaultBenchOptions gives the defaults of `finetune bench`: model "smollm2-135m", mode
// "lora", batch 4, seq 256, rank 16, 3 timed steps, checkpointing on, device "auto".
func DefaultBenchOptions() (BenchOptions, error) {
	if err := load(); err != nil {
		return BenchOptions{}, err
	}
	p := C.ftgo_bench_default_params()
	o := BenchOptions{Batch: uint32(p.batch), Seq: uint32(p.seq), Rank: uint32(p.rank),
		Steps: uint32(p.steps), Checkpointing: p.checkpointing != 0, Threads: int(p.n_threads),
		MaxDeviceMemoryMiB: uint64(p.max_device_memory_mib),
		OffloadActivations: p.offload_activations != 0, LmHeadInHost: p.lm_head_in_host_memory != 0,
		LayersInHost: int(p.layers_in_host_memory), KeptMlpLayers: uint32(p.kept_mlp_layers)}
	// Static strings of the library (NULL means the default).
	if p.model != nil {
		o.Model = C.GoString(p.model)
	}
	if p.mode != nil {
		o.Mode = C.GoString(p.mode)
	}
	if p.device != nil {
		o.Device = C.GoString(p.device)
	}
	return o, nil
}

// Bench builds a model of opts.Model's shape with random weights on the device, runs the
// warm-up (one step, two where the second records the pass) and opts.Steps timed training
// steps on random tokens, and returns the JSON object that `finetune bench` prints (model, device, mode, batch, seq, rank, checkpointing,
// offload_activations, kept_mlp_layers, lm_head_in_host, layers_in_host, steps, replayed, step_seconds_median,
// cpu_seconds_median, tokens_per_second, first_loss, last_loss, peak_rss_mib, peak_device_mib,
// peak_device_set_by, peak_device_purposes_mib, held_device_mib, load_seconds). opts may be nil
// for the defaults.
// It holds the calling goroutine's thread for the whole measurement, minutes for the larger
// shapes.
func Bench(opts *BenchOptions) (string, error) {
	if opts != nil {
		for _, f := range []struct {
			name string
			v    int
		}{{"Threads", opts.Threads}, {"LayersInHost", opts.LayersInHost}} {
			if f.v < 0 || uint64(f.v) > math.MaxUint32 {
				return "", &Error{Op: "ft_bench", Status: StatusInvalidArgument,
					Message: fmt.Sprintf("BenchOptions.%s %d is out of range", f.name, f.v)}
			}
		}
	}
	var out *C.char
	err := call("ft_bench", func() C.ft_status {
		if opts == nil {
			return C.ftgo_bench(nil, &out)
		}
		p := C.ft_bench_params{batch: C.uint32_t(opts.Batch), seq: C.uint32_t(opts.Seq),
			rank: C.uint32_t(opts.Rank), steps: C.uint32_t(opts.Steps),
			checkpointing: cbool(opts.Checkpointing), n_threads: C.uint32_t(opts.Threads),
			max_device_memory_mib:  C.uint64_t(opts.MaxDeviceMemoryMiB),
			offload_activations:    cbool(opts.OffloadActivations),
			lm_head_in_host_memory: cbool(opts.LmHeadInHost),
			layers_in_host_memory:  C.uint32_t(opts.LayersInHost),
			kept_mlp_layers:        C.uint32_t(opts.KeptMlpLayers)}
		// An empty model is passed as NULL, which the library refuses by name.
		for _, s := range []struct {
			dst **C.char
			v   string
		}{{&p.model, opts.Model}, {&p.mode, opts.Mode}, {&p.device, opts.Device}} {
			if s.v != "" {
				*s.dst = C.CString(s.v)
				defer C.free(unsafe.Pointer(*s.dst))
			}
		}
		return C.ftgo_bench(&p, &out)
	})
	if err != nil {
		return "", err
	}
	defer C.ftgo_string_free(out)
	return C.GoString(out), nil
}
