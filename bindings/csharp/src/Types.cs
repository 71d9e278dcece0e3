using System;
using System.Runtime.InteropServices;

namespace Finetune
{
    /// <summary>Status codes of the C API.</summary>
    public enum Status
    {
        Ok = 0, InvalidArgument = 1, Io = 2, Format = 3, Unsupported = 4, AdapterMismatch = 5,
        Cancelled = 6, NonFinite = 7, Internal = 8, Device = 9, OutOfMemory = 10,
        /// <summary>A data-parallel group failed: another rank failed, died or timed out.</summary>
        Collective = 11,
    }

    /// <summary>A failed library call, carrying the library's message.</summary>
    public class FinetuneException : Exception
    {
        /// <summary>The C function, such as "ft_model_load".</summary>
        public string Operation { get; private set; }
        public Status Status { get; private set; }
        /// <summary>The status's C name, such as "FT_ERR_IO".</summary>
        public string Code { get; private set; }
        /// <summary>ft_last_error()'s message.</summary>
        public string LibraryMessage { get; private set; }

        public FinetuneException(string operation, Status status, string code, string message)
            : base(operation + ": " + code + ": " + message)
        {
            Operation = operation;
            Status = status;
            Code = code;
            LibraryMessage = message;
        }
    }

    /// <summary>Element types of written weights.</summary>
    public enum DType { F32 = 0, F16 = 1, BF16 = 2 }

    /// <summary>Learning-rate schedules.</summary>
    public enum Schedule { Constant = 0, Linear = 1, Cosine = 2 }

    /// <summary>LoRA target projections.</summary>
    [Flags]
    public enum Targets : uint { Q = 1, K = 2, V = 4, O = 8, Gate = 16, Up = 32, Down = 64, All = 127 }

    /// <summary>How a model's frozen projection matrices are stored.</summary>
    public enum Quantization
    {
        /// <summary>The device's own format (f32 on the CPU, bf16 on a GPU).</summary>
        None = 0,
        /// <summary>NF4 with double-quantized absmax (QLoRA).</summary>
        Nf4 = 1,
    }

    /// <summary>Where and how to run a model. Null fields keep the library's defaults.</summary>
    public sealed class ModelOptions
    {
        /// <summary>"auto" (default), "cpu", "cuda:N", or several GPUs of this process training as
        /// one data-parallel group: "cuda:0,cuda:1" or "cuda:all".</summary>
        public string Device;
        /// <summary>CPU worker threads; 0 means one per core.</summary>
        public uint Threads;
        /// <summary>Storage of the frozen projection matrices (default None).</summary>
        public Quantization Quantization;
        /// <summary>Cap on the device memory held, in MiB (GPU only); 0 means none.</summary>
        public ulong MaxDeviceMemoryMiB;
        /// <summary>Ranks in a data-parallel group spanning processes; 0 or 1: this process trains
        /// alone (or over the GPUs Device lists). With more, Device must be one "cuda:N", and Rank and
        /// NcclUniqueId are needed; each step's batches are then this rank's share.</summary>
        public uint WorldSize;
        /// <summary>This process's rank, 0 ≤ Rank &lt; WorldSize.</summary>
        public uint Rank;
        /// <summary>The Library.NcclUniqueIdBytes (128) bytes Library.NcclUniqueId() made on one rank,
        /// the same on every rank; required when WorldSize &gt; 1.</summary>
        public byte[] NcclUniqueId;
        /// <summary>How long a rank waits for the others (joining, each step) before failing with
        /// Status.Collective instead of hanging, rounded up to whole milliseconds; zero means 5
        /// minutes.</summary>
        public TimeSpan CollectiveTimeout;
        /// <summary>Keep the LM head (or, tied, the embedding table serving as one) in pinned host
        /// memory instead of device memory (GPU only; ignored on the CPU).</summary>
        public bool LmHeadInHost;
        /// <summary>Decoder layers whose projection matrices stay in pinned host memory instead of
        /// device memory, each copied to the device ahead of the layer (GPU only; bf16 matrices
        /// whole, Quantization.Nf4 ones their codes): spread evenly over the layers, at most all
        /// of them (more is refused). Adjacent bf16 host layers make a pass wait on the bus.
        /// 0 means none.</summary>
        public uint LayersInHost;
    }

    /// <summary>A model's sizes.</summary>
    public sealed class ModelInfo
    {
        public long VocabSize, HiddenSize, IntermediateSize, NumLayers, NumHeads, NumKvHeads, HeadDim;
    }

    /// <summary>The adapters' shape. Unset fields keep the library's defaults (rank 16, alpha 16,
    /// all seven projections).</summary>
    public sealed class LoraOptions
    {
        public uint? Rank;
        public float? Alpha;
        public bool? UseRsLora;
        public float? Dropout;
        public Targets? TargetModules;
        public ulong? Seed;

        internal NativeLoraParams ToNative()
        {
            var p = Native.Lib.ft_lora_default_params();
            if (Rank.HasValue) p.rank = Rank.Value;
            if (Alpha.HasValue) p.alpha = Alpha.Value;
            if (UseRsLora.HasValue) p.use_rslora = UseRsLora.Value ? 1 : 0;
            if (Dropout.HasValue) p.dropout = Dropout.Value;
            if (TargetModules.HasValue) p.target_modules = (uint)TargetModules.Value;
            if (Seed.HasValue) p.seed = Seed.Value;
            return p;
        }
    }

    /// <summary>Optimizer and schedule. Unset fields keep the library's defaults.</summary>
    public sealed class TrainOptions
    {
        public float? LearningRate, WeightDecay, Beta1, Beta2, Eps, MaxGradNorm;
        public Schedule? Schedule;
        public ulong? WarmupSteps, TotalSteps, Seed;
        public bool? GradientCheckpointing;
        /// <summary>Keep the saved layer inputs in pinned host memory (GPU only).</summary>
        public bool? OffloadActivations;
        /// <summary>With checkpointing: the last this many layers keep their MLP's gate and up
        /// products instead of recomputing them (faster; 2 × tokens × intermediate_size values a
        /// layer of device memory).</summary>
        public uint? KeptMlpLayers;

        internal NativeTrainParams ToNative()
        {
            var p = Native.Lib.ft_train_default_params();
            if (LearningRate.HasValue) p.learning_rate = LearningRate.Value;
            if (WeightDecay.HasValue) p.weight_decay = WeightDecay.Value;
            if (Beta1.HasValue) p.beta1 = Beta1.Value;
            if (Beta2.HasValue) p.beta2 = Beta2.Value;
            if (Eps.HasValue) p.eps = Eps.Value;
            if (MaxGradNorm.HasValue) p.max_grad_norm = MaxGradNorm.Value;
            if (Schedule.HasValue) p.schedule = (int)Schedule.Value;
            if (WarmupSteps.HasValue) p.warmup_steps = WarmupSteps.Value;
            if (TotalSteps.HasValue) p.total_steps = TotalSteps.Value;
            if (Seed.HasValue) p.seed = Seed.Value;
            if (GradientCheckpointing.HasValue) p.gradient_checkpointing = GradientCheckpointing.Value ? 1 : 0;
            if (OffloadActivations.HasValue) p.offload_activations = OffloadActivations.Value ? 1 : 0;
            if (KeptMlpLayers.HasValue) p.kept_mlp_layers = KeptMlpLayers.Value;
            return p;
        }
    }

    /// <summary>BatchSize rows of SeqLen tokens, each array holding BatchSize*SeqLen values row by
    /// row. Labels[t] is the token expected after position t, or IgnoreLabel.</summary>
    public sealed class Batch
    {
        public const int IgnoreLabel = -100;
        public int[] InputIds, Labels, Positions, SegmentIds;
        public int BatchSize = 1;
        /// <summary>0 means InputIds.Length / BatchSize.</summary>
        public int SeqLen;

        public Batch() { }

        public Batch(int[] inputIds, int[] labels)
        {
            InputIds = inputIds;
            Labels = labels;
        }
    }

    /// <summary>What one optimizer step did.</summary>
    public sealed class StepStats
    {
        public long Step;
        public float Loss, GradNorm, LearningRate;
        public long Tokens, LabelledTokens;

        internal static StepStats From(NativeStepStats s)
        {
            return new StepStats
            {
                Step = (long)s.step, Loss = s.loss, GradNorm = s.grad_norm, LearningRate = s.learning_rate,
                Tokens = (long)s.tokens, LabelledTokens = (long)s.labelled_tokens,
            };
        }
    }

    /// <summary>The arguments of Trainer.Progress.</summary>
    public sealed class StepEventArgs : EventArgs
    {
        public StepStats Stats { get; private set; }
        public StepEventArgs(StepStats stats) { Stats = stats; }
    }

    /// <summary>Batches pinned as C structs for the duration of one call.</summary>
    internal sealed class PinnedBatches : IDisposable
    {
        readonly System.Collections.Generic.List<GCHandle> pins = new System.Collections.Generic.List<GCHandle>();
        public readonly NativeBatch[] Native;

        public PinnedBatches(System.Collections.Generic.IList<Batch> batches)
        {
            if (batches == null || batches.Count == 0) throw new ArgumentException("no batches", "batches");
            Native = new NativeBatch[batches.Count];
            try
            {
                for (int i = 0; i < batches.Count; i++)
                {
                    var b = batches[i];
                    if (b == null || b.InputIds == null) throw new ArgumentException("batch " + i + " has no InputIds");
                    int rows = b.BatchSize, seq = b.SeqLen > 0 ? b.SeqLen : b.InputIds.Length / Math.Max(rows, 1);
                    int n = rows * seq;
                    Native[i] = new NativeBatch
                    {
                        input_ids = Pin(i, "InputIds", b.InputIds, n, false),
                        labels = Pin(i, "Labels", b.Labels, n, false),
                        positions = Pin(i, "Positions", b.Positions, n, true),
                        segment_ids = Pin(i, "SegmentIds", b.SegmentIds, n, true),
                        batch_size = (uint)rows, seq_len = (uint)seq,
                    };
                }
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        IntPtr Pin(int i, string name, int[] values, int n, bool optional)
        {
            if (values == null && optional) return IntPtr.Zero;
            int len = values == null ? 0 : values.Length;
            if (len != n)
                throw new ArgumentException(string.Format(
                    "batch {0}: {1} has {2} values, BatchSize*SeqLen is {3}", i, name, len, n));
            var h = GCHandle.Alloc(values, GCHandleType.Pinned);
            pins.Add(h);
            return h.AddrOfPinnedObject();
        }

        public void Dispose()
        {
            foreach (var h in pins) h.Free();
            pins.Clear();
        }
    }
}
