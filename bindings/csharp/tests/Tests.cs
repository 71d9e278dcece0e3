// The C# binding's tests: a console runner (no test framework needed under Mono) that prints
// "N passed, N failed" and exits non-zero on a failure.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using System.Threading;
using System.Threading.Tasks;
using Finetune;

// IProgress that reports at once on the training thread (Progress<T> posts to a context).
sealed class SyncProgress : IProgress<StepStats>
{
    readonly Action<StepStats> f;
    public SyncProgress(Action<StepStats> f) { this.f = f; }
    public void Report(StepStats s) { f(s); }
}

static class Tests
{
    static Batch CountBatch(int seq)
    {
        var ids = new int[seq];
        var labels = new int[seq];
        for (int i = 0; i < seq; i++)
        {
            ids[i] = 3 + i;
            labels[i] = i + 1 < seq ? 4 + i : Batch.IgnoreLabel;
        }
        return new Batch(ids, labels);
    }

    static Model TinyModel() { return Model.Random("tiny", 1, new ModelOptions { Device = "cpu", Threads = 1 }); }

    static Trainer TinyTrainer(Model m)
    {
        return Trainer.Create(m, new LoraOptions { Rank = 8, Alpha = 16 },
            new TrainOptions { LearningRate = 1e-2f, TotalSteps = 1000, Schedule = Schedule.Constant });
    }

    static void Assert(bool ok, string what)
    {
        if (!ok) throw new Exception("assertion failed: " + what);
    }

    static string TempDir()
    {
        var d = Path.Combine(Path.GetTempPath(), "ft-cs-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(d);
        return d;
    }

    static void TrainsSavesReloadsAndGenerates()
    {
        var dir = TempDir();
        try
        {
            using (var model = TinyModel())
            using (var trainer = TinyTrainer(model))
            {
                var b = CountBatch(12);
                float before = trainer.EvalLoss(b);
                var seen = new List<long>();
                trainer.Progress += (s, e) => seen.Add(e.Stats.Step);
                var last = trainer.TrainAsync(new[] { b }, 12).Result;
                Assert(seen.Count == 12 && last.Step == 12, "12 progress events, saw " + seen.Count);
                Assert(trainer.EvalLoss(b) < before, "loss fell");
                trainer.SaveAdapter(Path.Combine(dir, "adapter"));
                using (var reloaded = Trainer.LoadAdapter(model, Path.Combine(dir, "adapter")))
                {
                    var outTokens = model.Generate(new[] { 3, 4, 5 }, 5, -1, reloaded);
                    Assert(outTokens.Length == 5, "5 tokens generated");
                }
                Assert(model.Info.VocabSize == 64, "vocab 64");
            }
        }
        finally { Directory.Delete(dir, true); }
    }

    // Loads the random "tiny" model with options, trains 8 steps on one batch, checks that the
    // loss fell, then runs then(model) (if given) before disposing of both.
    static void TrainsTiny(ModelOptions options, Action<Model> then = null)
    {
        using (var model = Model.Random("tiny", 1, options))
        using (var trainer = TinyTrainer(model))
        {
            var b = CountBatch(12);
            float before = trainer.EvalLoss(b);
            trainer.TrainAsync(new[] { b }, 8).Wait();
            Assert(trainer.EvalLoss(b) < before, "loss fell");
            if (then != null) then(model);
        }
    }

    static void QloraModelTrains()
    {
        TrainsTiny(new ModelOptions { Device = "cpu", Threads = 1, Quantization = Quantization.Nf4 });
    }

    static void BadModelPathThrowsWithTheLibraryMessage()
    {
        var missing = Path.Combine(Path.GetTempPath(), "no-such-model-dir");
        try
        {
            Model.Load(missing).Dispose();
            Assert(false, "loading a missing model succeeded");
        }
        catch (FinetuneException e)
        {
            Assert(e.Operation == "ft_model_load" && e.Status == Status.Io && e.Code == "FT_ERR_IO", e.Message);
            Assert(e.LibraryMessage.Contains("no-such-model-dir") && e.Message.Contains(e.LibraryMessage), e.Message);
        }
        try
        {
            Model.Random("no-such-shape").Dispose();
            Assert(false, "unknown shape accepted");
        }
        catch (FinetuneException e) { Assert(e.Message.Contains("no-such-shape"), e.Message); }
        using (var model = TinyModel())
        using (var trainer = TinyTrainer(model))
        {
            try
            {
                trainer.Step(new Batch(new[] { 1, 2 }, new[] { 1 }));
                Assert(false, "short labels accepted");
            }
            catch (ArgumentException) { }
        }
    }

    static void CancellationTokenStopsTraining()
    {
        using (var model = TinyModel())
        using (var trainer = TinyTrainer(model))
        using (var cts = new CancellationTokenSource())
        {
            long steps = 0;
            trainer.Progress += (s, e) => { steps = e.Stats.Step; if (steps == 3) cts.Cancel(); };
            var task = trainer.TrainAsync(new[] { CountBatch(8) }, 100000, cts.Token);
            try
            {
                task.Wait();
                Assert(false, "training was not cancelled");
            }
            catch (AggregateException e)
            {
                Assert(e.InnerException is OperationCanceledException, e.ToString());
            }
            Assert(task.IsCanceled, "task is Canceled, not " + task.Status);
            Assert(steps == 3, "stopped after 3 steps, took " + steps);
            Assert(trainer.Step(CountBatch(8)).Step == 4, "steps taken stay applied");
            using (var cts2 = new CancellationTokenSource())
            {
                try
                {
                    trainer.Train(new[] { CountBatch(8) }, 100000, cts2.Token, new SyncProgress(s => { if (s.Step == 6) cts2.Cancel(); }));
                    Assert(false, "training was not cancelled");
                }
                catch (OperationCanceledException e)
                {
                    var inner = e.InnerException as FinetuneException;
                    Assert(inner != null && inner.Status == Status.Cancelled, "carries the library's FT_ERR_CANCELLED");
                }
            }
            try
            {
                trainer.Train(new[] { CountBatch(8) }, 5, cts.Token);
                Assert(false, "cancelled token trained");
            }
            catch (OperationCanceledException) { }
        }
    }

    static void TrainingDoesNotBlockTheCaller()
    {
        using (var model = TinyModel())
        using (var trainer = TinyTrainer(model))
        {
            int ticks = 0;
            var task = trainer.TrainAsync(new[] { CountBatch(12) }, 60);
            while (!task.IsCompleted)
            {
                ticks++;
                Thread.Sleep(1);
            }
            Assert(task.Result.Step == 60, "60 steps");
            Assert(ticks > 1, "the caller ran while training: " + ticks);
        }
    }

    static void DisposeIsIdempotentAndUseAfterDisposeThrows()
    {
        var model = TinyModel();
        var trainer = TinyTrainer(model);
        trainer.Dispose();
        trainer.Dispose();
        try
        {
            trainer.SaveAdapter(Path.GetTempPath());
            Assert(false, "disposed trainer saved");
        }
        catch (ObjectDisposedException) { }
        using (var t2 = Trainer.Create(model))
        {
            model.Dispose();
            model.Dispose();
            Assert(t2.Step(CountBatch(8)).Step == 1, "a trainer outlives its model");
        }
        try
        {
            var unused = model.Info;
            Assert(false, "disposed model answered");
        }
        catch (ObjectDisposedException) { }
        Assert(trainer.Handle.IsClosed && model.Handle.IsClosed, "handles closed");
    }

    static void AbiVersionIsFiveAndStructsHaveTheHeadersSizes()
    {
        Assert(Library.AbiVersion == 5, "AbiVersion 5");
        Assert(!string.IsNullOrEmpty(Library.Version) && !string.IsNullOrEmpty(Library.Path), "library opened");
        // x86-64 sizes of the structs in include/finetune.h.
        var asm = typeof(Model).Assembly;
        int modelParams = Marshal.SizeOf(asm.GetType("Finetune.NativeModelParams", true));
        int benchParams = Marshal.SizeOf(asm.GetType("Finetune.NativeBenchParams", true));
        Assert(modelParams == 56, "ft_model_params is 56 bytes, not " + modelParams);
        Assert(benchParams == 72, "ft_bench_params is 72 bytes, not " + benchParams);
        // The fields added last sit where the header puts them (the structs' tail padding would hide
        // one of another width from the sizes).
        int lmHead = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeModelParams", true), "lm_head_in_host_memory");
        int layers = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeModelParams", true), "layers_in_host_memory");
        Assert(lmHead == 44 && layers == 48,
            "ft_model_params.lm_head_in_host_memory at 44 and layers_in_host_memory at 48, not " + lmHead + " and " + layers);
        int benchOffload = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeBenchParams", true), "offload_activations");
        int benchLmHead = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeBenchParams", true), "lm_head_in_host_memory");
        int benchLayers = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeBenchParams", true), "layers_in_host_memory");
        Assert(benchOffload == 56 && benchLmHead == 60 && benchLayers == 64,
            "ft_bench_params.offload_activations at 56, lm_head_in_host_memory at 60 and layers_in_host_memory at 64, not "
            + benchOffload + ", " + benchLmHead + " and " + benchLayers);
        int trainParams = Marshal.SizeOf(asm.GetType("Finetune.NativeTrainParams", true));
        Assert(trainParams == 72, "ft_train_params is 72 bytes, not " + trainParams);
        int benchKept = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeBenchParams", true), "kept_mlp_layers");
        int trainKept = (int)Marshal.OffsetOf(asm.GetType("Finetune.NativeTrainParams", true), "kept_mlp_layers");
        Assert(benchKept == 68 && trainKept == 68,
            "kept_mlp_layers at 68 of ft_bench_params and ft_train_params, not " + benchKept + " and " + trainKept);
    }

    static void OtherAbiVersionIsRefused()
    {
        if (Environment.GetEnvironmentVariable("FT_CS_CHILD") == "1") return;
        var dir = TempDir();
        try
        {
            string src = Path.Combine(dir, "old.c"), lib = Path.Combine(dir, "libfinetune.so");
            File.WriteAllText(src, "unsigned ft_abi_version(void) { return 2; }\n");
            Process cc;
            try { cc = Process.Start(new ProcessStartInfo("cc", "-shared -fPIC -o \"" + lib + "\" \"" + src + "\"") { UseShellExecute = false }); }
            catch (System.ComponentModel.Win32Exception) { Console.WriteLine("     (no C compiler: not checked)"); return; }
            cc.WaitForExit();
            Assert(cc.ExitCode == 0, "cc built the stand-in library");
            string output = RunLoadOnly(lib);
            Assert(output.Contains("has C ABI version 2, this binding needs 5"), output);
        }
        finally { Directory.Delete(dir, true); }
    }

    static void ExpectArgumentException(string what, Action f, params string[] needles)
    {
        try
        {
            f();
            Assert(false, what + " accepted");
        }
        catch (ArgumentException e)
        {
            foreach (var n in needles) Assert(e.Message.Contains(n), what + ": message lacks \"" + n + "\": " + e.Message);
        }
    }

    static void ProcessGroupOptionsAreChecked()
    {
        var missing = Path.Combine(Path.GetTempPath(), "no-such-model-dir");
        ExpectArgumentException("missing id", () => Model.Load(missing, new ModelOptions { Device = "cuda:0", WorldSize = 2 }),
            "NcclUniqueId is missing but WorldSize is 2");
        ExpectArgumentException("short id", () => Model.Load(missing, new ModelOptions { Device = "cuda:0", WorldSize = 2, NcclUniqueId = new byte[5] }),
            "NcclUniqueId has 5 bytes", "128");
        ExpectArgumentException("long id", () => Model.Random("tiny", 0, new ModelOptions { WorldSize = 2, NcclUniqueId = new byte[129] }),
            "NcclUniqueId has 129 bytes");
        ExpectArgumentException("negative timeout", () => Model.Random("tiny", 0, new ModelOptions { CollectiveTimeout = TimeSpan.FromSeconds(-1) }),
            "CollectiveTimeout");
        // Valid options reach the library, which reads each field where the header puts it: the rank
        // and world size it quotes, then (the id read) the device a rank needs.
        var id = new byte[Library.NcclUniqueIdBytes];
        try
        {
            Model.Random("tiny", 0, new ModelOptions { Device = "cpu", WorldSize = 2, Rank = 5, NcclUniqueId = id,
                CollectiveTimeout = TimeSpan.FromMilliseconds(1.5) }).Dispose();
            Assert(false, "rank 5 of 2 accepted");
        }
        catch (FinetuneException e)
        {
            Assert(e.Status == Status.InvalidArgument && e.Message.Contains("rank 5 is outside a group of params->world_size 2"), e.Message);
        }
        try
        {
            Model.Random("tiny", 0, new ModelOptions { Device = "cpu", Threads = 1, WorldSize = 2, Rank = 1, NcclUniqueId = id }).Dispose();
            Assert(false, "a rank on the CPU accepted");
        }
        catch (FinetuneException e)
        {
            Assert(e.Message.Contains("rank 1 of a multi-process group") && e.Message.Contains("cuda:N"), e.Message);
        }
        // WorldSize 1 is alone: no id needed.
        Model.Random("tiny", 0, new ModelOptions { Device = "cpu", Threads = 1, WorldSize = 1, CollectiveTimeout = TimeSpan.FromMinutes(1) }).Dispose();
    }

    static void NcclUniqueIdIs128BytesOrAnErrorNamingNccl()
    {
        Assert((int)Status.Collective == 11, "Status.Collective is 11");
        byte[] id;
        try { id = Library.NcclUniqueId(); }
        catch (FinetuneException e)
        {
            Assert(e.Operation == "ft_nccl_unique_id" && e.Message.Contains("NCCL"), e.Message);
            Console.WriteLine("     (no NCCL here: {0})", e.LibraryMessage);
            return;
        }
        Assert(id.Length == 128, "128 bytes, not " + id.Length);
    }

    static void BenchRunsTheTinyShapeOnTheCpu()
    {
        var d = Library.DefaultBenchOptions();
        Assert(d.Model == "smollm2-135m" && d.Mode == "lora" && d.Batch == 4 && d.Checkpointing == true, "defaults");
        string json = Library.Bench(new BenchOptions { Model = "tiny", Device = "cpu", Threads = 1, Batch = 1, Seq = 16, Steps = 2 });
        Assert(json.Contains("\"model\":\"tiny\"") || json.Contains("\"model\": \"tiny\""), json);
        var m = Regex.Match(json, "\"tokens_per_second\"\\s*:\\s*([0-9.eE+-]+)");
        Assert(m.Success, "tokens_per_second in " + json);
        double tps = double.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
        Assert(tps > 0, "tokens_per_second above 0: " + json);
        try
        {
            Library.Bench(new BenchOptions { Model = "no-such-shape", Device = "cpu" });
            Assert(false, "unknown shape accepted");
        }
        catch (FinetuneException e) { Assert(e.Status == Status.InvalidArgument && e.Message.Contains("no-such-shape"), e.Message); }
    }

    // GPU only: on the CPU the flag is read and ignored, and the model trains as usual.
    static void LmHeadInHostIsAcceptedOnTheCpu()
    {
        TrainsTiny(new ModelOptions { Device = "cpu", Threads = 1, LmHeadInHost = true },
            model => Assert(model.Generate(new[] { 3, 4, 5 }, 4).Length == 4, "4 tokens generated"));
    }

    // The tiny shape has two layers: the library refuses a third, quoting the count it read.
    static void LayersInHostReachesTheLibrary()
    {
        try
        {
            Model.Random("tiny", 0, new ModelOptions { Device = "cpu", Threads = 1, LayersInHost = 3 }).Dispose();
            Assert(false, "3 of 2 layers in host memory accepted");
        }
        catch (FinetuneException e)
        {
            Assert(e.Status == Status.InvalidArgument && e.Message.Contains("layers_in_host: 3 layers asked for; the model has 2"), e.Message);
        }
        Model.Random("tiny", 0, new ModelOptions { Device = "cpu", Threads = 1, LayersInHost = 0 }).Dispose();
    }

    static bool JsonFlag(string json, string key)
    {
        var m = Regex.Match(json, "\"" + key + "\"\\s*:\\s*(true|false)");
        Assert(m.Success, key + " in " + json);
        return m.Groups[1].Value == "true";
    }

    static long JsonNumber(string json, string key)
    {
        var m = Regex.Match(json, "\"" + key + "\"\\s*:\\s*(-?[0-9]+)");
        Assert(m.Success, key + " in " + json);
        return long.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
    }

    static void BenchPassesTheOffloadOptions()
    {
        var d = Library.DefaultBenchOptions();
        Assert(d.OffloadActivations == false && d.LmHeadInHost == false && d.LayersInHost == 0 && d.KeptMlpLayers == 0,
            "offload defaults off");
        var o = new BenchOptions { Model = "tiny", Device = "cpu", Threads = 1, Batch = 1, Seq = 16, Steps = 1 };
        string plain = Library.Bench(o);
        Assert(!JsonFlag(plain, "offload_activations") && !JsonFlag(plain, "lm_head_in_host"), plain);
        Assert(JsonNumber(plain, "layers_in_host") == 0 && JsonNumber(plain, "kept_mlp_layers") == 0, plain);
        o.OffloadActivations = true;
        o.LmHeadInHost = true;
        o.KeptMlpLayers = 1;
        string json = Library.Bench(o);
        Assert(JsonFlag(json, "offload_activations") && JsonFlag(json, "lm_head_in_host"), json);
        Assert(JsonNumber(json, "kept_mlp_layers") == 1, json);
        o.KeptMlpLayers = null;
        // Both of the tiny shape's layers may stay in host memory (kept on the CPU as they are); a
        // third is refused, quoting the count the library read.
        o.LayersInHost = 2;
        Assert(JsonNumber(Library.Bench(o), "layers_in_host") == 2, "2 layers of 2 in host memory");
        o.LayersInHost = 3;
        try
        {
            Library.Bench(o);
            Assert(false, "3 of 2 layers in host memory accepted");
        }
        catch (FinetuneException e)
        {
            Assert(e.Status == Status.InvalidArgument && e.Message.Contains("layers_in_host: 3 layers asked for; the model has 2"), e.Message);
        }
    }

    static string RunLoadOnly(string lib)
    {
        string exe = typeof(Tests).Assembly.Location;
        var psi = new ProcessStartInfo("mono", "\"" + exe + "\" --load-only")
        {
            UseShellExecute = false, RedirectStandardOutput = true,
        };
        psi.EnvironmentVariables["FINETUNE_LIB"] = lib;
        psi.EnvironmentVariables["LD_LIBRARY_PATH"] = "";
        psi.EnvironmentVariables["FT_CS_CHILD"] = "1";
        using (var p = Process.Start(psi))
        {
            string text = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            return text;
        }
    }

    static void MissingLibraryNamesEveryPlaceLooked()
    {
        if (Environment.GetEnvironmentVariable("FT_CS_CHILD") == "1") return;
        Func<string, string> run = RunLoadOnly;
        string bad = run("/nonexistent/libfinetune.so");
        Assert(bad.Contains("FINETUNE_LIB=/nonexistent/libfinetune.so"), bad);
        string none = run("");
        if (none.Contains("LOADED")) return; // installed system-wide: nothing to check
        Assert(none.Contains("FINETUNE_LIB (not set)") && none.Contains("/usr/local/lib/libfinetune.so (absent)"), none);
        Assert(none.Contains(Path.Combine(Path.GetDirectoryName(typeof(Model).Assembly.Location), "libfinetune.so")), none);
    }

    static int Main(string[] args)
    {
        if (args.Length == 1 && args[0] == "--load-only")
        {
            try { Model.Random("tiny").Dispose(); Console.WriteLine("LOADED"); }
            catch (Exception e) { Console.WriteLine(e.Message); }
            return 0;
        }
        var tests = new List<KeyValuePair<string, Action>>
        {
            new KeyValuePair<string, Action>("TrainsSavesReloadsAndGenerates", TrainsSavesReloadsAndGenerates),
            new KeyValuePair<string, Action>("QloraModelTrains", QloraModelTrains),
            new KeyValuePair<string, Action>("BadModelPathThrowsWithTheLibraryMessage", BadModelPathThrowsWithTheLibraryMessage),
            new KeyValuePair<string, Action>("CancellationTokenStopsTraining", CancellationTokenStopsTraining),
            new KeyValuePair<string, Action>("TrainingDoesNotBlockTheCaller", TrainingDoesNotBlockTheCaller),
            new KeyValuePair<string, Action>("DisposeIsIdempotentAndUseAfterDisposeThrows", DisposeIsIdempotentAndUseAfterDisposeThrows),
            new KeyValuePair<string, Action>("MissingLibraryNamesEveryPlaceLooked", MissingLibraryNamesEveryPlaceLooked),
            new KeyValuePair<string, Action>("AbiVersionIsFiveAndStructsHaveTheHeadersSizes", AbiVersionIsFiveAndStructsHaveTheHeadersSizes),
            new KeyValuePair<string, Action>("OtherAbiVersionIsRefused", OtherAbiVersionIsRefused),
            new KeyValuePair<string, Action>("ProcessGroupOptionsAreChecked", ProcessGroupOptionsAreChecked),
            new KeyValuePair<string, Action>("NcclUniqueIdIs128BytesOrAnErrorNamingNccl", NcclUniqueIdIs128BytesOrAnErrorNamingNccl),
            new KeyValuePair<string, Action>("BenchRunsTheTinyShapeOnTheCpu", BenchRunsTheTinyShapeOnTheCpu),
            new KeyValuePair<string, Action>("LmHeadInHostIsAcceptedOnTheCpu", LmHeadInHostIsAcceptedOnTheCpu),
            new KeyValuePair<string, Action>("LayersInHostReachesTheLibrary", LayersInHostReachesTheLibrary),
            new KeyValuePair<string, Action>("BenchPassesTheOffloadOptions", BenchPassesTheOffloadOptions),
        };
        int passed = 0, failed = 0;
        foreach (var t in tests)
        {
            var sw = Stopwatch.StartNew();
            try
            {
                t.Value();
                passed++;
                Console.WriteLine("ok   {0} ({1} ms)", t.Key, sw.ElapsedMilliseconds);
            }
            catch (Exception e)
            {
                failed++;
                Console.WriteLine("FAIL {0}: {1}", t.Key, e);
            }
        }
        Console.WriteLine("{0} passed, {1} failed", passed, failed);
        return failed == 0 ? 0 : 1;
    }
}
