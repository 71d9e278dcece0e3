package finetune

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// countBatch is one row counting upwards: the model learns to continue the count.
func countBatch(seq int) Batch {
	ids, labels := make([]int32, seq), make([]int32, seq)
	for i := range ids {
		ids[i] = int32(3 + i)
		labels[i] = int32(4 + i)
	}
	labels[seq-1] = IgnoreLabel
	return Batch{InputIDs: ids, Labels: labels, BatchSize: 1, SeqLen: seq}
}

func tinyTrainer(t *testing.T) (*Model, *Trainer) {
	t.Helper()
	m, err := RandomModel("tiny", 1, &ModelOptions{Device: "cpu", Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	lora, err := DefaultLoRAOptions()
	if err != nil {
		t.Fatal(err)
	}
	lora.Rank, lora.Alpha = 8, 16
	train, _ := DefaultTrainOptions()
	train.LearningRate, train.TotalSteps = 1e-2, 20
	tr, err := NewTrainer(m, &lora, &train)
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close(); m.Close() })
	return m, tr
}

// trainsTiny loads the random "tiny" model with opts, trains 8 steps on one batch and fails
// unless the evaluation loss falls; it returns the model (closed with the test).
func trainsTiny(t *testing.T, opts *ModelOptions) *Model {
	t.Helper()
	m, err := RandomModel("tiny", 1, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	train, _ := DefaultTrainOptions()
	train.LearningRate = 1e-2
	tr, err := NewTrainer(m, nil, &train)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	b := countBatch(12)
	before, err := tr.EvalLoss(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Train(context.Background(), []Batch{b}, 8, nil); err != nil {
		t.Fatal(err)
	}
	if after, _ := tr.EvalLoss(b); !(after < before) {
		t.Fatalf("loss did not fall: %v -> %v", before, after)
	}
	return m
}

func TestQLoRATrains(t *testing.T) {
	trainsTiny(t, &ModelOptions{Device: "cpu", Threads: 1, Quantization: QuantNF4})
}

func TestTrainSaveReloadGenerate(t *testing.T) {
	m, tr := tinyTrainer(t)
	b := countBatch(12)
	before, err := tr.EvalLoss(b)
	if err != nil {
		t.Fatal(err)
	}
	var seen []StepStats
	if err := tr.Train(context.Background(), []Batch{b}, 12, func(s StepStats) { seen = append(seen, s) }); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 12 || seen[11].Step != 12 {
		t.Fatalf("progress saw %d steps: %+v", len(seen), seen)
	}
	after, _ := tr.EvalLoss(b)
	if !(after < before) {
		t.Fatalf("loss did not fall: %v -> %v", before, after)
	}
	dir := filepath.Join(t.TempDir(), "adapter")
	if err := tr.SaveAdapter(dir); err != nil {
		t.Fatal(err)
	}
	re, err := LoadAdapter(m, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	out, err := m.Generate(b.InputIDs[:3], 5, -1, re)
	if err != nil || len(out) != 5 {
		t.Fatalf("generate: %v %v", out, err)
	}
	info, err := m.Info()
	if err != nil || info.VocabSize != 64 {
		t.Fatalf("info: %+v %v", info, err)
	}
}

func TestBadModelPathIsAnErrorWithTheLibraryMessage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "no-such-model")
	m, err := LoadModel(path, nil)
	if m != nil || err == nil {
		t.Fatal("loading a missing model succeeded")
	}
	var fe *Error
	if !errors.As(err, &fe) || fe.Op != "ft_model_load" || fe.Status == StatusOK {
		t.Fatalf("not a finetune error: %#v", err)
	}
	if !strings.Contains(fe.Message, "no-such-model") || !strings.Contains(err.Error(), fe.Message) {
		t.Fatalf("message does not name the path: %q", err)
	}
}

func TestBadArgumentsAreErrors(t *testing.T) {
	_, err := RandomModel("no-such-shape", 0, nil)
	if err == nil || !strings.Contains(err.Error(), "no-such-shape") {
		t.Fatalf("unknown shape: %v", err)
	}
	_, tr := tinyTrainer(t)
	_, err = tr.Step(Batch{InputIDs: []int32{1, 2}, Labels: []int32{1}, BatchSize: 1, SeqLen: 2})
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("short labels: %v", err)
	}
}

func TestContextCancelStopsTraining(t *testing.T) {
	_, tr := tinyTrainer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	steps := 0
	err := tr.Train(ctx, []Batch{countBatch(8)}, 1000, func(s StepStats) {
		steps++
		if s.Step == 3 {
			cancel()
		}
	})
	if !errors.Is(err, ErrCancelled) || !errors.Is(err, context.Canceled) {
		t.Fatalf("want a cancellation error, got %v", err)
	}
	if steps != 3 {
		t.Fatalf("took %d steps after cancelling at 3", steps)
	}
	// Already cancelled: no step at all, and the trainer is still usable.
	if err := tr.Train(ctx, []Batch{countBatch(8)}, 5, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: %v", err)
	}
	if s, err := tr.Step(countBatch(8)); err != nil || s.Step != 4 {
		t.Fatalf("step after cancel: %+v %v", s, err)
	}
}

func TestCloseIsIdempotentAndUseAfterCloseFails(t *testing.T) {
	m, tr := tinyTrainer(t)
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tr.SaveAdapter(t.TempDir()); err == nil {
		t.Fatal("closed trainer saved")
	}
	// The model outlives its trainers and the other way round.
	tr2, err := NewTrainer(m, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	if _, err := tr2.Step(countBatch(8)); err != nil {
		t.Fatalf("trainer after model close: %v", err)
	}
	tr2.Close()
	if _, err := m.Info(); err == nil {
		t.Fatal("closed model answered")
	}
}

// The library search runs once per process, so the missing-library cases run in a child.
func TestMissingLibraryErrorSaysWhereItLooked(t *testing.T) {
	if os.Getenv("FINETUNE_GO_CHILD") == "1" {
		_, err := Load()
		if err == nil {
			os.Stdout.WriteString("LOADED\n")
			return
		}
		os.Stdout.WriteString(err.Error() + "\n")
		return
	}
	run := func(env ...string) string {
		cmd := exec.Command(os.Args[0], "-test.run=^TestMissingLibraryErrorSaysWhereItLooked$")
		cmd.Env = append(os.Environ(), append([]string{"FINETUNE_GO_CHILD=1", "LD_LIBRARY_PATH="}, env...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
		return string(out)
	}
	out := run("FINETUNE_LIB=/nonexistent/libfinetune.so")
	if !strings.Contains(out, "FINETUNE_LIB=/nonexistent/libfinetune.so") {
		t.Fatalf("bad FINETUNE_LIB: %s", out)
	}
	out = run("FINETUNE_LIB=")
	if strings.Contains(out, "LOADED") {
		t.Log("libfinetune.so is installed where the search finds it; not checking the message")
		return
	}
	for _, want := range []string{"FINETUNE_LIB (not set)", filepath.Join("bindings", "go", "libfinetune.so"), "/usr/local/lib/libfinetune.so"} {
		if !strings.Contains(out, want) {
			t.Fatalf("message lacks %q: %s", want, out)
		}
	}
}

func TestABIVersion(t *testing.T) {
	if ABIVersion != 5 {
		t.Fatalf("ABIVersion is %d", ABIVersion)
	}
	if _, err := Load(); err != nil {
		t.Fatalf("the library of this tree is refused: %v", err)
	}
}

// A library reporting another ABI is refused with both versions in the message, before any other
// symbol is looked up (an older library lacks some). The check runs once per process: in a child.
func TestOtherABIVersionIsRefused(t *testing.T) {
	if os.Getenv("FINETUNE_GO_CHILD") == "1" {
		if _, err := Load(); err != nil {
			os.Stdout.WriteString(err.Error() + "\n")
		} else {
			os.Stdout.WriteString("LOADED\n")
		}
		return
	}
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler to build a stand-in library")
	}
	dir := t.TempDir()
	src, lib := filepath.Join(dir, "old.c"), filepath.Join(dir, "libfinetune.so")
	if err := os.WriteFile(src, []byte("unsigned ft_abi_version(void) { return 2; }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(cc, "-shared", "-fPIC", "-o", lib, src).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestOtherABIVersionIsRefused$")
	cmd.Env = append(os.Environ(), "FINETUNE_GO_CHILD=1", "FINETUNE_LIB="+lib)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "C ABI version 2, this package needs 5") {
		t.Fatalf("message: %s", out)
	}
}

func TestProcessGroupOptionsAreChecked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model")
	for _, c := range []struct {
		name string
		opts ModelOptions
		want []string
	}{
		{"missing id", ModelOptions{Device: "cuda:0", WorldSize: 2}, []string{"NCCLUniqueID is missing", "WorldSize is 2"}},
		{"short id", ModelOptions{Device: "cuda:0", WorldSize: 2, NCCLUniqueID: make([]byte, 5)}, []string{"NCCLUniqueID has 5 bytes", "128"}},
		{"long id", ModelOptions{WorldSize: 2, NCCLUniqueID: make([]byte, 129)}, []string{"NCCLUniqueID has 129 bytes"}},
		{"negative rank", ModelOptions{WorldSize: 2, Rank: -1, NCCLUniqueID: make([]byte, 128)}, []string{"Rank -1"}},
		{"negative timeout", ModelOptions{CollectiveTimeout: -time.Second}, []string{"CollectiveTimeout"}},
		{"huge timeout", ModelOptions{CollectiveTimeout: math.MaxInt64}, []string{"CollectiveTimeout"}},
	} {
		_, err := LoadModel(path, &c.opts)
		if !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("%s: want an invalid-argument error, got %v", c.name, err)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Fatalf("%s: message lacks %q: %v", c.name, w, err)
			}
		}
		if _, err := RandomModel("tiny", 0, &c.opts); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("%s: RandomModel: %v", c.name, err)
		}
	}
	// Valid options reach the library, which reads each field where the header puts it: the
	// rank and world size it quotes, then (the id read) the device a rank needs.
	id := make([]byte, NCCLUniqueIDBytes)
	_, err := RandomModel("tiny", 0, &ModelOptions{Device: "cpu", WorldSize: 2, Rank: 5, NCCLUniqueID: id,
		CollectiveTimeout: 1500 * time.Microsecond})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "rank 5 is outside a group of params->world_size 2") {
		t.Fatalf("rank outside the group: %v", err)
	}
	_, err = RandomModel("tiny", 0, &ModelOptions{Device: "cpu", Threads: 1, WorldSize: 2, Rank: 1, NCCLUniqueID: id})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "rank 1 of a multi-process group") ||
		!strings.Contains(err.Error(), "cuda:N") {
		t.Fatalf("a rank on the CPU: %v", err)
	}
	// WorldSize 1 is alone: no id needed.
	m, err := RandomModel("tiny", 0, &ModelOptions{Device: "cpu", Threads: 1, WorldSize: 1, CollectiveTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
}

func TestNCCLUniqueID(t *testing.T) {
	id, err := NCCLUniqueID()
	if err == nil {
		if len(id) != NCCLUniqueIDBytes || NCCLUniqueIDBytes != 128 {
			t.Fatalf("an id of %d bytes", len(id))
		}
		return
	}
	// The usual case on a machine without NCCL.
	var fe *Error
	if !errors.As(err, &fe) || fe.Op != "ft_nccl_unique_id" || !strings.Contains(fe.Message, "NCCL") {
		t.Fatalf("want an error naming NCCL, got %v", err)
	}
	t.Logf("no NCCL here: %v", err)
}

func TestStatusCollective(t *testing.T) {
	if StatusCollective != 11 || StatusCollective.String() != "FT_ERR_COLLECTIVE" {
		t.Fatalf("StatusCollective is %d %q", int32(StatusCollective), StatusCollective)
	}
	err := error(&Error{Op: "ft_trainer_step", Status: StatusCollective, Message: "rank 1 died"})
	if !errors.Is(err, ErrCollective) || errors.Is(err, ErrDevice) {
		t.Fatalf("errors.Is: %v", err)
	}
}

func TestBenchTinyOnTheCPU(t *testing.T) {
	d, err := DefaultBenchOptions()
	if err != nil {
		t.Fatal(err)
	}
	if d.Model != "smollm2-135m" || d.Mode != "lora" || d.Batch != 4 || d.Steps != 3 || !d.Checkpointing {
		t.Fatalf("defaults: %+v", d)
	}
	opts := d
	opts.Model, opts.Device, opts.Threads = "tiny", "cpu", 1
	opts.Batch, opts.Seq, opts.Steps = 1, 16, 2
	out, err := Bench(&opts)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Model           string  `json:"model"`
		Device          string  `json:"device"`
		Steps           int     `json:"steps"`
		TokensPerSecond float64 `json:"tokens_per_second"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if r.Model != "tiny" || r.Steps != 2 || !(r.TokensPerSecond > 0) {
		t.Fatalf("result: %s", out)
	}
	opts.Model = "no-such-shape"
	if _, err := Bench(&opts); !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "no-such-shape") {
		t.Fatalf("unknown shape: %v", err)
	}
	opts.Model, opts.Steps = "tiny", 0
	if _, err := Bench(&opts); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("zero steps: %v", err)
	}
}

// LmHeadInHost is GPU only: on the CPU the flag is read and ignored, and the model trains as usual.
func TestLmHeadInHostIsAcceptedOnTheCPU(t *testing.T) {
	m := trainsTiny(t, &ModelOptions{Device: "cpu", Threads: 1, LmHeadInHost: true})
	if out, err := m.Generate([]int32{3, 4, 5}, 4, -1, nil); err != nil || len(out) != 4 {
		t.Fatalf("generate: %v %v", out, err)
	}
}

// The tiny shape has two layers: the library refuses a third, quoting the count it read.
func TestLayersInHostReachesTheLibrary(t *testing.T) {
	_, err := RandomModel("tiny", 0, &ModelOptions{Device: "cpu", Threads: 1, LayersInHost: 3})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "layers_in_host: 3 layers asked for; the model has 2") {
		t.Fatalf("3 layers of 2: %v", err)
	}
	_, err = RandomModel("tiny", 0, &ModelOptions{Device: "cpu", LayersInHost: -1})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "LayersInHost -1") {
		t.Fatalf("negative LayersInHost: %v", err)
	}
	m, err := RandomModel("tiny", 0, &ModelOptions{Device: "cpu", Threads: 1, LayersInHost: 0})
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
}

func TestBenchPassesTheOffloadOptions(t *testing.T) {
	d, err := DefaultBenchOptions()
	if err != nil {
		t.Fatal(err)
	}
	if d.OffloadActivations || d.LmHeadInHost || d.LayersInHost != 0 || d.KeptMlpLayers != 0 {
		t.Fatalf("defaults: %+v", d)
	}
	opts := d
	opts.Model, opts.Device, opts.Threads = "tiny", "cpu", 1
	opts.Batch, opts.Seq, opts.Steps = 1, 16, 1
	flags := func(o BenchOptions) (offload, lmHead bool, layers, kept int) {
		t.Helper()
		out, err := Bench(&o)
		if err != nil {
			t.Fatal(err)
		}
		var r struct {
			OffloadActivations *bool `json:"offload_activations"`
			LmHeadInHost       *bool `json:"lm_head_in_host"`
			LayersInHost       *int  `json:"layers_in_host"`
			KeptMlpLayers      *int  `json:"kept_mlp_layers"`
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("not JSON: %v\n%s", err, out)
		}
		if r.OffloadActivations == nil || r.LmHeadInHost == nil || r.LayersInHost == nil ||
			r.KeptMlpLayers == nil {
			t.Fatalf("keys missing: %s", out)
		}
		return *r.OffloadActivations, *r.LmHeadInHost, *r.LayersInHost, *r.KeptMlpLayers
	}
	if offload, lmHead, layers, kept := flags(opts); offload || lmHead || layers != 0 || kept != 0 {
		t.Fatalf("off by default, got offload_activations %v, lm_head_in_host %v, layers_in_host %d, "+
			"kept_mlp_layers %d", offload, lmHead, layers, kept)
	}
	opts.OffloadActivations, opts.LmHeadInHost, opts.KeptMlpLayers = true, true, 1
	if offload, lmHead, _, kept := flags(opts); !offload || !lmHead || kept != 1 {
		t.Fatalf("set, got offload_activations %v, lm_head_in_host %v, kept_mlp_layers %d",
			offload, lmHead, kept)
	}
	opts.KeptMlpLayers = 0
	// Both of the tiny shape's layers may stay in host memory (kept on the CPU as they are); a third
	// is refused, quoting the count the library read.
	opts.LayersInHost = 2
	if _, _, layers, _ := flags(opts); layers != 2 {
		t.Fatalf("2 layers of 2: layers_in_host %d", layers)
	}
	opts.LayersInHost = 3
	if _, err := Bench(&opts); !errors.Is(err, ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "layers_in_host: 3 layers asked for; the model has 2") {
		t.Fatalf("3 layers of 2: %v", err)
	}
	opts.LayersInHost = -1
	if _, err := Bench(&opts); !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "LayersInHost -1") {
		t.Fatalf("negative LayersInHost: %v", err)
	}
}
