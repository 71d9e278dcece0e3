package finetune

/*
#include <stdlib.h>
#include "loader.h"
*/
import "C"

import (
	"context"
	"fmt"
	"runtime"
	"runtime/cgo"
	"sync"
	"unsafe"
)

// Targets of LoRA adapters, to OR together in LoRAOptions.Targets.
const (
	TargetQ    = C.FT_TARGET_Q
	TargetK    = C.FT_TARGET_K
	TargetV    = C.FT_TARGET_V
	TargetO    = C.FT_TARGET_O
	TargetGate = C.FT_TARGET_GATE
	TargetUp   = C.FT_TARGET_UP
	TargetDown = C.FT_TARGET_DOWN
	TargetAll  = C.FT_TARGET_ALL
)

// Learning-rate schedules for TrainOptions.Schedule.
const (
	ScheduleConstant = C.FT_SCHEDULE_CONSTANT
	ScheduleLinear   = C.FT_SCHEDULE_LINEAR
	ScheduleCosine   = C.FT_SCHEDULE_COSINE
)

// LoRAOptions is the adapters' shape. Start from DefaultLoRAOptions.
type LoRAOptions struct {
	Rank    uint32
	Alpha   float32
	RSLoRA  bool    // scale alpha/sqrt(rank) instead of alpha/rank
	Dropout float32 // on the adapter input while training, in [0, 1)
	Targets uint32  // OR of Target* bits
	Seed    uint64
}

// TrainOptions is the optimizer and schedule. Start from DefaultTrainOptions.
type TrainOptions struct {
	LearningRate, WeightDecay, Beta1, Beta2, Eps float32
	MaxGradNorm                                  float32 // 0 disables clipping
	Schedule                                     int32   // one of Schedule*
	WarmupSteps, TotalSteps                      uint64
	GradientCheckpointing                        bool
	Seed                                         uint64
	OffloadActivations                           bool // saved layer inputs in pinned host memory (GPU only)
	// With checkpointing: the last this many layers keep their MLP's gate and up products
	// instead of recomputing them (faster; 2 × tokens × intermediate_size values a layer of
	// device memory).
	KeptMlpLayers uint32
}

// DefaultLoRAOptions gives the library's defaults (rank 16, alpha 16, all projections).
func DefaultLoRAOptions() (LoRAOptions, error) {
	if err := load(); err != nil {
		return LoRAOptions{}, err
	}
	p := C.ftgo_lora_default_params()
	return LoRAOptions{Rank: uint32(p.rank), Alpha: float32(p.alpha), RSLoRA: p.use_rslora != 0,
		Dropout: float32(p.dropout), Targets: uint32(p.target_modules), Seed: uint64(p.seed)}, nil
}

// DefaultTrainOptions gives the library's defaults (AdamW, lr 2e-4, linear over 100 steps).
func DefaultTrainOptions() (TrainOptions, error) {
	if err := load(); err != nil {
		return TrainOptions{}, err
	}
	p := C.ftgo_train_default_params()
	return TrainOptions{LearningRate: float32(p.learning_rate), WeightDecay: float32(p.weight_decay),
		Beta1: float32(p.beta1), Beta2: float32(p.beta2), Eps: float32(p.eps),
		MaxGradNorm: float32(p.max_grad_norm), Schedule: int32(p.schedule),
		WarmupSteps: uint64(p.warmup_steps), TotalSteps: uint64(p.total_steps),
		GradientCheckpointing: p.gradient_checkpointing != 0, Seed: uint64(p.seed),
		OffloadActivations: p.offload_activations != 0, KeptMlpLayers: uint32(p.kept_mlp_layers)}, nil
}

func (o *LoRAOptions) c() *C.ft_lora_params {
	if o == nil {
		return nil
	}
	return &C.ft_lora_params{rank: C.uint32_t(o.Rank), alpha: C.float(o.Alpha),
		use_rslora: cbool(o.RSLoRA), dropout: C.float(o.Dropout),
		target_modules: C.uint32_t(o.Targets), seed: C.uint64_t(o.Seed)}
}

func (o *TrainOptions) c() *C.ft_train_params {
	if o == nil {
		return nil
	}
	return &C.ft_train_params{learning_rate: C.float(o.LearningRate), weight_decay: C.float(o.WeightDecay),
		beta1: C.float(o.Beta1), beta2: C.float(o.Beta2), eps: C.float(o.Eps),
		max_grad_norm: C.float(o.MaxGradNorm), schedule: C.int32_t(o.Schedule),
		warmup_steps: C.uint64_t(o.WarmupSteps), total_steps: C.uint64_t(o.TotalSteps),
		gradient_checkpointing: cbool(o.GradientCheckpointing), seed: C.uint64_t(o.Seed),
		offload_activations: cbool(o.OffloadActivations), kept_mlp_layers: C.uint32_t(o.KeptMlpLayers)}
}

func cbool(b bool) C.int32_t {
	if b {
		return 1
	}
	return 0
}

// Batch is BatchSize rows of SeqLen tokens, each slice holding BatchSize*SeqLen values row by
// row. Labels[t] is the token expected after position t, or IgnoreLabel. Positions and
// SegmentIDs may be nil (0..SeqLen in each row; one segment a row).
type Batch struct {
	InputIDs, Labels, Positions, SegmentIDs []int32
	BatchSize, SeqLen                       int
}

// StepStats is what one optimizer step did.
type StepStats struct {
	Step                   uint64
	Loss, GradNorm, LR     float32
	Tokens, LabelledTokens uint64
}

func statsOf(s *C.ft_step_stats) StepStats {
	return StepStats{Step: uint64(s.step), Loss: float32(s.loss), GradNorm: float32(s.grad_norm),
		LR: float32(s.learning_rate), Tokens: uint64(s.tokens), LabelledTokens: uint64(s.labelled_tokens)}
}

// cBatches copies batches into C memory (the library reads them during the call only).
func cBatches(batches []Batch) (*C.ft_batch, func(), error) {
	if len(batches) == 0 {
		return nil, func() {}, &Error{Op: "batches", Status: StatusInvalidArgument, Message: "no batches"}
	}
	var allocs []unsafe.Pointer
	free := func() {
		for _, p := range allocs {
			C.free(p)
		}
	}
	arr := (*C.ft_batch)(C.calloc(C.size_t(len(batches)), C.size_t(unsafe.Sizeof(C.ft_batch{}))))
	allocs = append(allocs, unsafe.Pointer(arr))
	dup := func(v []int32) *C.int32_t {
		if v == nil {
			return nil
		}
		p := C.malloc(C.size_t(4 * (len(v) + 1)))
		allocs = append(allocs, p)
		copy(unsafe.Slice((*int32)(p), len(v)), v)
		return (*C.int32_t)(p)
	}
	cs := unsafe.Slice(arr, len(batches))
	for i, src := range batches {
		n := src.BatchSize * src.SeqLen
		fields := []struct {
			name     string
			v        []int32
			optional bool
		}{{"InputIDs", src.InputIDs, false}, {"Labels", src.Labels, false},
			{"Positions", src.Positions, true}, {"SegmentIDs", src.SegmentIDs, true}}
		for _, f := range fields {
			if len(f.v) != n && !(f.optional && f.v == nil) {
				free()
				return nil, func() {}, &Error{Op: "batches", Status: StatusInvalidArgument,
					Message: fmt.Sprintf("batch %d: %s has %d values, BatchSize*SeqLen is %d", i, f.name, len(f.v), n)}
			}
		}
		c := &cs[i]
		c.input_ids, c.labels = dup(src.InputIDs), dup(src.Labels)
		c.positions, c.segment_ids = dup(src.Positions), dup(src.SegmentIDs)
		c.batch_size, c.seq_len = C.uint32_t(src.BatchSize), C.uint32_t(src.SeqLen)
	}
	return arr, free, nil
}

// Trainer holds LoRA adapters and their optimizer over a model. Its methods serialize on the
// trainer: it is safe to share, but calls run one at a time. Close releases it.
type Trainer struct {
	mu sync.Mutex
	h  *C.ft_trainer
}

func newTrainer(h *C.ft_trainer) *Trainer {
	t := &Trainer{h: h}
	runtime.SetFinalizer(t, func(t *Trainer) { t.Close() })
	return t
}

// NewTrainer attaches fresh LoRA adapters to m. lora and train may be nil for the defaults.
func NewTrainer(m *Model, lora *LoRAOptions, train *TrainOptions) (*Trainer, error) {
	var h *C.ft_trainer
	err := m.use(func(mh *C.ft_model) error {
		return call("ft_trainer_new", func() C.ft_status {
			return C.ftgo_trainer_new(mh, lora.c(), train.c(), &h)
		})
	})
	if err != nil {
		return nil, err
	}
	return newTrainer(h), nil
}

// LoadAdapter loads a PEFT adapter directory onto m, to continue training or to generate.
func LoadAdapter(m *Model, dir string, train *TrainOptions) (*Trainer, error) {
	var h *C.ft_trainer
	err := m.use(func(mh *C.ft_model) error {
		return call("ft_trainer_load_adapter", func() C.ft_status {
			cdir := C.CString(dir)
			defer C.free(unsafe.Pointer(cdir))
			return C.ftgo_trainer_load_adapter(mh, cdir, train.c(), &h)
		})
	})
	if err != nil {
		return nil, err
	}
	return newTrainer(h), nil
}

func (t *Trainer) use(f func(h *C.ft_trainer) error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h == nil {
		return errClosed
	}
	return f(t.h)
}

// Step takes one optimizer step over the micro-batches (gradient accumulation).
func (t *Trainer) Step(batches ...Batch) (StepStats, error) {
	var s C.ft_step_stats
	err := t.use(func(h *C.ft_trainer) error {
		arr, free, err := cBatches(batches)
		if err != nil {
			return err
		}
		defer free()
		return call("ft_trainer_step", func() C.ft_status {
			return C.ftgo_trainer_step(h, arr, C.size_t(len(batches)), &s)
		})
	})
	return statsOf(&s), err
}

type trainState struct {
	ctx      context.Context
	progress func(StepStats)
}

//export ftgoProgress
func ftgoProgress(stats *C.ft_step_stats, handle C.uintptr_t) C.int32_t {
	st := cgo.Handle(handle).Value().(*trainState)
	if st.progress != nil {
		st.progress(statsOf(stats))
	}
	if st.ctx.Err() != nil {
		return 1
	}
	return 0
}

// Train takes steps optimizer steps, step i on batches[i%len(batches)], calling progress (may
// be nil) after each on the calling goroutine. Cancelling ctx stops training after the step in
// flight; the steps taken stay applied and the error matches both ErrCancelled and ctx.Err().
func (t *Trainer) Train(ctx context.Context, batches []Batch, steps uint64, progress func(StepStats)) error {
	if err := ctx.Err(); err != nil {
		return &Error{Op: "ft_trainer_train", Status: StatusCancelled, Message: "cancelled before the first step", cause: err}
	}
	return t.use(func(h *C.ft_trainer) error {
		arr, free, err := cBatches(batches)
		if err != nil {
			return err
		}
		defer free()
		handle := cgo.NewHandle(&trainState{ctx: ctx, progress: progress})
		defer handle.Delete()
		err = call("ft_trainer_train", func() C.ft_status {
			return C.ftgo_trainer_train(h, arr, C.size_t(len(batches)), C.uint64_t(steps), C.uintptr_t(handle))
		})
		if e, ok := err.(*Error); ok && e.Status == StatusCancelled {
			e.cause = ctx.Err()
		}
		return err
	})
}

// EvalLoss is the mean loss on one batch with the current adapters, without updating them.
func (t *Trainer) EvalLoss(b Batch) (float32, error) {
	var loss C.float
	err := t.use(func(h *C.ft_trainer) error {
		arr, free, err := cBatches([]Batch{b})
		if err != nil {
			return err
		}
		defer free()
		return call("ft_trainer_eval_loss", func() C.ft_status { return C.ftgo_trainer_eval_loss(h, arr, &loss) })
	})
	return float32(loss), err
}

// SaveAdapter writes the adapters in PEFT's format into dir.
func (t *Trainer) SaveAdapter(dir string) error {
	return t.use(func(h *C.ft_trainer) error {
		return call("ft_trainer_save_adapter", func() C.ft_status {
			cdir := C.CString(dir)
			defer C.free(unsafe.Pointer(cdir))
			return C.ftgo_trainer_save_adapter(h, cdir)
		})
	})
}

// ExportMerged writes the base model with the adapters merged in, as a Hugging Face directory.
func (t *Trainer) ExportMerged(dir string, dtype DType) error {
	return t.use(func(h *C.ft_trainer) error {
		return call("ft_trainer_export_merged", func() C.ft_status {
			cdir := C.CString(dir)
			defer C.free(unsafe.Pointer(cdir))
			return C.ftgo_trainer_export_merged(h, cdir, C.int32_t(dtype))
		})
	})
}

// Close releases the trainer, waiting for a call in progress. It is safe to call more than once.
func (t *Trainer) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h != nil {
		C.ftgo_trainer_free(t.h)
		t.h = nil
		runtime.SetFinalizer(t, nil)
	}
	return nil
}
