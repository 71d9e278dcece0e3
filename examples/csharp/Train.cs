// Fine-tunes a model with LoRA from C#: load, attach adapters, train a few steps on a tiny
// counting sequence as a Task (progress events, Ctrl-C cancels), save the adapter, reload it and
// generate a line.
//
//   mcs -target:library -out:Finetune.dll bindings/csharp/src/*.cs
//   mcs -r:Finetune.dll -out:train.exe examples/csharp/Train.cs
//   FINETUNE_LIB=target/release/libfinetune.so mono train.exe <model_dir> <adapter_out_dir>
using System;
using System.Linq;
using System.Threading;
using Finetune;

static class Program
{
    static int Main(string[] args)
    {
        if (args.Length != 2)
        {
            Console.Error.WriteLine("usage: train.exe <model_dir> <adapter_out_dir>");
            return 2;
        }
        try
        {
            using (var model = Model.Load(args[0], new ModelOptions { Device = "cpu" }))
            using (var trainer = Trainer.Create(model, new LoraOptions { Rank = 8, Alpha = 16 },
                       new TrainOptions { LearningRate = 1e-2f, TotalSteps = 30 }))
            using (var cancel = new CancellationTokenSource())
            {
                Console.CancelKeyPress += (s, e) => { e.Cancel = true; cancel.Cancel(); };
                // One row counting upwards; the model learns to continue the count.
                var ids = Enumerable.Range(3, 16).ToArray();
                var labels = ids.Select((x, i) => i + 1 < ids.Length ? x + 1 : Batch.IgnoreLabel).ToArray();
                var batch = new Batch(ids, labels);

                float first = 0;
                trainer.Progress += (s, e) =>
                {
                    if (e.Stats.Step == 1) first = e.Stats.Loss;
                    if (e.Stats.Step % 10 == 0) Console.WriteLine("step {0}  loss {1:F4}", e.Stats.Step, e.Stats.Loss);
                };
                var last = trainer.TrainAsync(new[] { batch }, 30, cancel.Token).GetAwaiter().GetResult();
                Console.WriteLine("loss {0:F4} -> {1:F4}", first, last.Loss);

                trainer.SaveAdapter(args[1]);
                Console.WriteLine("saved adapter to {0}", args[1]);
                using (var reloaded = Trainer.LoadAdapter(model, args[1]))
                {
                    var output = model.Generate(ids.Take(3).ToArray(), 8, -1, reloaded);
                    Console.WriteLine("generated: {0}", string.Join(" ", output));
                }
                return last.Loss < first ? 0 : 1;
            }
        }
        catch (FinetuneException e)
        {
            Console.Error.WriteLine(e.Message);
            return 1;
        }
    }
}
