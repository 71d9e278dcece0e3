// Fine-tunes a model with LoRA from Go: load, attach adapters, train a few steps on a tiny
// counting sequence with progress and Ctrl-C cancellation, save the adapter, reload it and
// generate a line.
//
//	FINETUNE_LIB=target/release/libfinetune.so go run . <model_dir> <adapter_out_dir>
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"finetune"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: example <model_dir> <adapter_out_dir>")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(modelDir, adapterDir string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	model, err := finetune.LoadModel(modelDir, &finetune.ModelOptions{Device: "cpu"})
	if err != nil {
		return err
	}
	defer model.Close()

	lora, _ := finetune.DefaultLoRAOptions()
	lora.Rank, lora.Alpha = 8, 16
	opts, _ := finetune.DefaultTrainOptions()
	opts.LearningRate, opts.TotalSteps = 1e-2, 30
	trainer, err := finetune.NewTrainer(model, &lora, &opts)
	if err != nil {
		return err
	}
	defer trainer.Close()

	// One row counting upwards; the model learns to continue the count.
	const seq = 16
	batch := finetune.Batch{BatchSize: 1, SeqLen: seq}
	for i := 0; i < seq; i++ {
		batch.InputIDs = append(batch.InputIDs, int32(3+i))
		batch.Labels = append(batch.Labels, int32(4+i))
	}
	batch.Labels[seq-1] = finetune.IgnoreLabel

	var first, last float32
	err = trainer.Train(ctx, []finetune.Batch{batch}, 30, func(s finetune.StepStats) {
		if s.Step == 1 {
			first = s.Loss
		}
		last = s.Loss
		if s.Step%10 == 0 {
			fmt.Printf("step %d  loss %.4f\n", s.Step, s.Loss)
		}
	})
	if err != nil {
		return err
	}
	fmt.Printf("loss %.4f -> %.4f\n", first, last)

	if err := trainer.SaveAdapter(adapterDir); err != nil {
		return err
	}
	fmt.Println("saved adapter to", adapterDir)

	reloaded, err := finetune.LoadAdapter(model, adapterDir, nil)
	if err != nil {
		return err
	}
	defer reloaded.Close()
	out, err := model.Generate(batch.InputIDs[:3], 8, -1, reloaded)
	if err != nil {
		return err
	}
	fmt.Println("generated:", out)
	if !(last < first) {
		return fmt.Errorf("the loss did not fall")
	}
	return nil
}
