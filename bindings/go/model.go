package finetune

/*
#include <stdlib.h>
#include "loader.h"
*/
import "C"

import (
	"errors"
	"runtime"
	"sync"
	"unsafe"
)

// DType is the element type of written weights.
type DType int32

const (
	F32  DType = C.FT_DTYPE_F32
	F16  DType = C.FT_DTYPE_F16
	BF16 DType = C.FT_DTYPE_BF16
)

// IgnoreLabel in Batch.Labels means "no loss at this position".
const IgnoreLabel = C.FT_IGNORE_LABEL

// Quantization says how a model's frozen projection matrices are stored.
type Quantization int32

const (
	// QuantNone keeps them in the device's own format (f32 on the CPU, bf16 on a GPU).
	QuantNone Quantization = C.FT_QUANT_NONE
	// QuantNF4 keeps them in NF4 with double-quantized absmax (QLoRA).
	QuantNF4 Quantization = C.FT_QUANT_NF4
)

// ModelOptions says where and how to run a model. The zero value means the defaults.
type ModelOptions struct {
	Device             string       // "auto" (default), "cpu" or "cuda:N"
	Threads            int          // CPU worker threads; 0 means one per core
	Quantization       Quantization // QuantNone (default) or QuantNF4 (QLoRA)
	MaxDeviceMemoryMiB uint64       // cap on the device memory held (GPU only); 0 means none
}

// ModelInfo holds a model's sizes.
type ModelInfo struct {
	VocabSize, HiddenSize, IntermediateSize  int
	NumLayers, NumHeads, NumKVHeads, HeadDim int
}

// Model is a frozen base model. It is safe for concurrent use. Close releases it; trainers made
// from it stay usable.
type Model struct {
	mu sync.RWMutex
	h  *C.ft_model
}

var errClosed = errors.New("finetune: use of a closed object")

func withModelParams(o *ModelOptions, f func(*C.ft_model_params) C.ft_status) C.ft_status {
	p := C.ftgo_model_default_params()
	if o != nil {
		p.n_threads = C.uint32_t(o.Threads)
		p.quantization = C.int32_t(o.Quantization)
		p.max_device_memory_mib = C.uint64_t(o.MaxDeviceMemoryMiB)
		if o.Device != "" {
			p.device = C.CString(o.Device)
			defer C.free(unsafe.Pointer(p.device))
		}
	}
	return f(&p)
}

func newModel(h *C.ft_model) *Model {
	m := &Model{h: h}
	runtime.SetFinalizer(m, func(m *Model) { m.Close() })
	return m
}

// LoadModel loads a Hugging Face model directory (config.json + safetensors). opts may be nil.
func LoadModel(path string, opts *ModelOptions) (*Model, error) {
	var h *C.ft_model
	err := call("ft_model_load", func() C.ft_status {
		cpath := C.CString(path)
		defer C.free(unsafe.Pointer(cpath))
		return withModelParams(opts, func(p *C.ft_model_params) C.ft_status {
			return C.ftgo_model_load(cpath, p, &h)
		})
	})
	if err != nil {
		return nil, err
	}
	return newModel(h), nil
}

// RandomModel makes a model of a named shape ("tiny", "smollm2-135m", ...) with random weights,
// for tests and demos.
func RandomModel(shape string, seed uint64, opts *ModelOptions) (*Model, error) {
	var h *C.ft_model
	err := call("ft_model_random", func() C.ft_status {
		cshape := C.CString(shape)
		defer C.free(unsafe.Pointer(cshape))
		return withModelParams(opts, func(p *C.ft_model_params) C.ft_status {
			return C.ftgo_model_random(cshape, C.uint64_t(seed), p, &h)
		})
	})
	if err != nil {
		return nil, err
	}
	return newModel(h), nil
}

// use runs f with the live handle, holding it against a concurrent Close.
func (m *Model) use(f func(h *C.ft_model) error) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.h == nil {
		return errClosed
	}
	return f(m.h)
}

// Info gives the model's sizes.
func (m *Model) Info() (ModelInfo, error) {
	var i C.ft_model_info
	err := m.use(func(h *C.ft_model) error {
		return call("ft_model_get_info", func() C.ft_status { return C.ftgo_model_get_info(h, &i) })
	})
	return ModelInfo{
		VocabSize: int(i.vocab_size), HiddenSize: int(i.hidden_size),
		IntermediateSize: int(i.intermediate_size), NumLayers: int(i.num_layers),
		NumHeads: int(i.num_heads), NumKVHeads: int(i.num_kv_heads), HeadDim: int(i.head_dim),
	}, err
}

// Save writes the model as a Hugging Face directory with weights of dtype.
func (m *Model) Save(dir string, dtype DType) error {
	return m.use(func(h *C.ft_model) error {
		return call("ft_model_save", func() C.ft_status {
			cdir := C.CString(dir)
			defer C.free(unsafe.Pointer(cdir))
			return C.ftgo_model_save(h, cdir, C.int32_t(dtype))
		})
	})
}

// Generate appends up to maxNew greedy tokens to prompt, stopping after stop if stop >= 0, and
// returns the new tokens. With a non-nil adapter its LoRA weights are applied.
func (m *Model) Generate(prompt []int32, maxNew int, stop int32, adapter *Trainer) ([]int32, error) {
	if len(prompt) == 0 {
		return nil, &Error{Op: "ft_model_generate", Status: StatusInvalidArgument, Message: "prompt is empty"}
	}
	out := make([]int32, maxNew+1)
	var n C.size_t
	gen := func(h *C.ft_model, th *C.ft_trainer) error {
		return call("ft_model_generate", func() C.ft_status {
			cprompt := (*C.int32_t)(C.malloc(C.size_t(4 * len(prompt))))
			defer C.free(unsafe.Pointer(cprompt))
			copy(unsafe.Slice((*int32)(unsafe.Pointer(cprompt)), len(prompt)), prompt)
			return C.ftgo_model_generate(h, th, cprompt, C.size_t(len(prompt)), C.size_t(maxNew),
				C.int32_t(stop), (*C.int32_t)(unsafe.Pointer(&out[0])), &n)
		})
	}
	err := m.use(func(h *C.ft_model) error {
		if adapter == nil {
			return gen(h, nil)
		}
		return adapter.use(func(th *C.ft_trainer) error { return gen(h, th) })
	})
	if err != nil {
		return nil, err
	}
	return out[:int(n)], nil
}

// Close releases the model. It is safe to call more than once.
func (m *Model) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h != nil {
		C.ftgo_model_free(m.h)
		m.h = nil
		runtime.SetFinalizer(m, nil)
	}
	return nil
}
