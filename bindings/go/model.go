package finetune

/*
#include <stdlib.h>
#include "loader.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"time"
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

// NCCLUniqueIDBytes is the length of an NCCL unique id (ModelOptions.NCCLUniqueID).
const NCCLUniqueIDBytes = C.FT_NCCL_UNIQUE_ID_BYTES

// ModelOptions says where and how to run a model. The zero value means the defaults.
type ModelOptions struct {
	// "auto" (default), "cpu", "cuda:N", or several GPUs of this process training as one
	// data-parallel group: "cuda:0,cuda:1" or "cuda:all".
	Device             string
	Threads            int          // CPU worker threads; 0 means one per core
	Quantization       Quantization // QuantNone (default) or QuantNF4 (QLoRA)
	MaxDeviceMemoryMiB uint64       // cap on the device memory held (GPU only); 0 means none
	// Keep the LM head (or, tied, the embedding table serving as one) in pinned host memory
	// instead of device memory (GPU only; ignored on the CPU).
	LmHeadInHost bool
	// Decoder layers whose projection matrices stay in pinned host memory instead of device
	// memory, each copied to the device ahead of the layer (GPU only; bf16 matrices whole,
	// QuantNF4 ones their codes): spread evenly over the layers, at most all of them (more is
	// refused). Adjacent bf16 host layers make a pass wait on the bus. 0 means none.
	LayersInHost int

	// A data-parallel group spanning processes: WorldSize ranks in all (0 or 1: this process
	// trains alone, or over the GPUs Device lists). With more, Device must be one "cuda:N",
	// Rank (0 ≤ Rank < WorldSize) says where this process stands, and NCCLUniqueID is the
	// NCCLUniqueIDBytes bytes that NCCLUniqueID() made on one rank, handed by the application
	// to every rank. Each step's batches are then this rank's share; loading waits until every
	// rank has joined.
	WorldSize    int
	Rank         int
	NCCLUniqueID []byte
	// How long a rank waits for the others (joining, each step) before failing with
	// ErrCollective instead of hanging, rounded up to whole milliseconds; 0 means 5 minutes.
	CollectiveTimeout time.Duration
}

// check refuses options the C struct cannot carry, or a process group without its unique id,
// before any call.
func (o *ModelOptions) check(op string) error {
	if o == nil {
		return nil
	}
	bad := func(format string, args ...any) error {
		return &Error{Op: op, Status: StatusInvalidArgument, Message: fmt.Sprintf(format, args...)}
	}
	if o.WorldSize < 0 || uint64(o.WorldSize) > math.MaxUint32 {
		return bad("ModelOptions.WorldSize %d is out of range", o.WorldSize)
	}
	if o.Rank < 0 || uint64(o.Rank) > math.MaxUint32 {
		return bad("ModelOptions.Rank %d is out of range", o.Rank)
	}
	if o.LayersInHost < 0 || uint64(o.LayersInHost) > math.MaxUint32 {
		return bad("ModelOptions.LayersInHost %d is out of range", o.LayersInHost)
	}
	if n := len(o.NCCLUniqueID); n != 0 && n != NCCLUniqueIDBytes {
		return bad("ModelOptions.NCCLUniqueID has %d bytes; an NCCL unique id has %d", n, NCCLUniqueIDBytes)
	}
	if o.WorldSize > 1 && len(o.NCCLUniqueID) == 0 {
		return bad("ModelOptions.NCCLUniqueID is missing but WorldSize is %d: make one with "+
			"NCCLUniqueID() on one rank and give it to every rank", o.WorldSize)
	}
	if o.CollectiveTimeout < 0 || o.CollectiveTimeout > math.MaxUint32*time.Millisecond {
		return bad("ModelOptions.CollectiveTimeout %v is out of range", o.CollectiveTimeout)
	}
	return nil
}

// timeoutMillis rounds d (checked: 0 ≤ d ≤ MaxUint32 ms) up to whole milliseconds, so that a
// positive timeout never becomes 0 (the default).
func timeoutMillis(d time.Duration) int64 {
	return int64((d + time.Millisecond - 1) / time.Millisecond)
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
		p.world_size = C.uint32_t(o.WorldSize)
		p.rank = C.uint32_t(o.Rank)
		p.collective_timeout_ms = C.uint32_t(timeoutMillis(o.CollectiveTimeout))
		p.lm_head_in_host_memory = cbool(o.LmHeadInHost)
		p.layers_in_host_memory = C.uint32_t(o.LayersInHost)
		if o.Device != "" {
			p.device = C.CString(o.Device)
			defer C.free(unsafe.Pointer(p.device))
		}
		// A C copy: the struct lives in Go memory and may not hold a Go pointer. Freed after
		// the call, which reads it during the call only.
		if len(o.NCCLUniqueID) != 0 {
			id := C.CBytes(o.NCCLUniqueID)
			defer C.free(id)
			p.nccl_unique_id = (*C.uint8_t)(id)
		}
	}
	return f(&p)
}

// NCCLUniqueID makes a fresh NCCL unique id (NCCLUniqueIDBytes bytes) for a data-parallel group
// spanning processes (ModelOptions.WorldSize > 1). Call it on one rank and hand the bytes to
// the others however the application likes; that process hosts the group's rendezvous and must
// stay alive until every rank has loaded its model. It needs NCCL (libnccl.so.2): without it
// the error is ErrDevice and names it.
func NCCLUniqueID() ([]byte, error) {
	id := make([]byte, NCCLUniqueIDBytes)
	err := call("ft_nccl_unique_id", func() C.ft_status {
		return C.ftgo_nccl_unique_id((*C.uint8_t)(unsafe.Pointer(&id[0])), C.size_t(len(id)))
	})
	if err != nil {
		return nil, err
	}
	return id, nil
}

func newModel(h *C.ft_model) *Model {
	m := &Model{h: h}
	runtime.SetFinalizer(m, func(m *Model) { m.Close() })
	return m
}

// LoadModel loads a Hugging Face model directory (config.json + safetensors). opts may be nil.
func LoadModel(path string, opts *ModelOptions) (*Model, error) {
	if err := opts.check("ft_model_load"); err != nil {
		return nil, err
	}
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
	if err := opts.check("ft_model_random"); err != nil {
		return nil, err
	}
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
