using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;

namespace Finetune
{
    /// <summary>What Library.Bench measures: the options of `finetune bench`. Unset fields keep the
    /// library's defaults (Library.DefaultBenchOptions()).</summary>
    public sealed class BenchOptions
    {
        /// <summary>A named shape with random weights: "smollm2-135m" (default), "llama3.2-1b",
        /// "llama3-8b", "mistral-7b", "qwen2.5-7b", "gemma-7b" or "tiny".</summary>
        public string Model;
        /// <summary>"lora" (default) or "qlora" (frozen projection matrices in NF4).</summary>
        public string Mode;
        /// <summary>Rows per step and GPU (default 4), tokens per row (256), LoRA rank with alpha
        /// equal to it (16), timed steps after the untimed warm-up (one step, two where the second
        /// records the pass on a GPU) (3); each at least 1.</summary>
        public uint? Batch, Seq, Rank, Steps;
        /// <summary>Recompute each layer in the backward pass (default true).</summary>
        public bool? Checkpointing;
        /// <summary>CPU worker threads; 0 (default) means one per core.</summary>
        public uint? Threads;
        /// <summary>"auto" (default), "cpu", "cuda:N", "cuda:0,cuda:1" or "cuda:all" (each GPU
        /// takes Batch rows).</summary>
        public string Device;
        /// <summary>Cap on the device memory held, in MiB (GPU only); 0 means none.</summary>
        public ulong? MaxDeviceMemoryMiB;
        /// <summary>Keep the saved layer inputs in pinned host memory (GPU only; default false).</summary>
        public bool? OffloadActivations;
        /// <summary>Keep the LM head in pinned host memory instead of device memory (GPU only;
        /// default false).</summary>
        public bool? LmHeadInHost;
        /// <summary>Decoder layers kept in pinned host memory, as ModelOptions.LayersInHost (GPU
        /// only; default 0).</summary>
        public uint? LayersInHost;
        /// <summary>Layers that keep their MLP's gate and up products, as
        /// TrainOptions.KeptMlpLayers (default 0).</summary>
        public uint? KeptMlpLayers;
    }

    /// <summary>The library as a whole: its version, NCCL unique ids for data-parallel groups
    /// spanning processes, and the training-step benchmark.</summary>
    public static class Library
    {
        /// <summary>The C ABI version this binding is written for; a library reporting another is
        /// refused when it is opened.</summary>
        public const uint AbiVersion = Native.AbiVersion;

        /// <summary>Bytes of an NCCL unique id (ModelOptions.NcclUniqueId).</summary>
        public const int NcclUniqueIdBytes = Native.NcclUniqueIdBytes;

        /// <summary>Where the library was opened from (opening it now if needed).</summary>
        public static string Path { get { return Native.Lib.Path; } }

        /// <summary>The library's version, such as "0.1.0".</summary>
        public static string Version { get { return Native.Utf8(Native.Lib.ft_version()); } }

        /// <summary>A fresh NCCL unique id for a data-parallel group spanning processes: make it on
        /// one rank, hand it to the others however the application likes, and pass it to every rank
        /// as ModelOptions.NcclUniqueId with WorldSize and Rank. This process hosts the group's
        /// rendezvous and must stay alive until every rank has loaded its model. Without NCCL
        /// (libnccl.so.2) it throws a FinetuneException with Status.Device that names it.</summary>
        public static byte[] NcclUniqueId()
        {
            var id = new byte[NcclUniqueIdBytes];
            Native.Check("ft_nccl_unique_id", Native.Lib.ft_nccl_unique_id(id, (UIntPtr)id.Length));
            return id;
        }

        /// <summary>The defaults of `finetune bench`, every field set.</summary>
        public static BenchOptions DefaultBenchOptions()
        {
            var d = Native.Lib.ft_bench_default_params();
            return new BenchOptions
            {
                Model = Native.Utf8(d.model),
                Mode = d.mode == IntPtr.Zero ? "lora" : Native.Utf8(d.mode),
                Batch = d.batch, Seq = d.seq, Rank = d.rank, Steps = d.steps,
                Checkpointing = d.checkpointing != 0, Threads = d.n_threads,
                Device = d.device == IntPtr.Zero ? "auto" : Native.Utf8(d.device),
                MaxDeviceMemoryMiB = d.max_device_memory_mib,
                OffloadActivations = d.offload_activations != 0,
                LmHeadInHost = d.lm_head_in_host_memory != 0,
                LayersInHost = d.layers_in_host_memory,
                KeptMlpLayers = d.kept_mlp_layers,
            };
        }

        /// <summary>The training-step benchmark of `finetune bench`: builds a model of the named
        /// shape with random weights, runs the warm-up (one step, two where the second records the
        /// pass) and Steps timed steps on random tokens, and
        /// returns the JSON text `finetune bench` prints (model, device, mode, batch, seq, rank,
        /// checkpointing, offload_activations, kept_mlp_layers, lm_head_in_host, layers_in_host, steps,
        /// replayed, step_seconds_median, cpu_seconds_median, tokens_per_second, first_loss, last_loss,
        /// peak_rss_mib, peak_device_mib, peak_device_set_by, peak_device_purposes_mib,
        /// held_device_mib, load_seconds). Runs on the calling thread: minutes for the larger
        /// shapes.</summary>
        public static string Bench(BenchOptions options = null)
        {
            var api = Native.Lib;
            var p = api.ft_bench_default_params();
            var pins = new List<GCHandle>();
            Func<string, IntPtr, IntPtr> str = (s, dflt) =>
            {
                if (s == null) return dflt;
                pins.Add(GCHandle.Alloc(Native.Utf8Z(s), GCHandleType.Pinned));
                return pins[pins.Count - 1].AddrOfPinnedObject();
            };
            try
            {
                if (options != null)
                {
                    p.model = str(options.Model, p.model);
                    p.mode = str(options.Mode, p.mode);
                    p.device = str(options.Device, p.device);
                    if (options.Batch.HasValue) p.batch = options.Batch.Value;
                    if (options.Seq.HasValue) p.seq = options.Seq.Value;
                    if (options.Rank.HasValue) p.rank = options.Rank.Value;
                    if (options.Steps.HasValue) p.steps = options.Steps.Value;
                    if (options.Checkpointing.HasValue) p.checkpointing = options.Checkpointing.Value ? 1 : 0;
                    if (options.Threads.HasValue) p.n_threads = options.Threads.Value;
                    if (options.MaxDeviceMemoryMiB.HasValue) p.max_device_memory_mib = options.MaxDeviceMemoryMiB.Value;
                    if (options.OffloadActivations.HasValue) p.offload_activations = options.OffloadActivations.Value ? 1 : 0;
                    if (options.LmHeadInHost.HasValue) p.lm_head_in_host_memory = options.LmHeadInHost.Value ? 1 : 0;
                    if (options.LayersInHost.HasValue) p.layers_in_host_memory = options.LayersInHost.Value;
                    if (options.KeptMlpLayers.HasValue) p.kept_mlp_layers = options.KeptMlpLayers.Value;
                }
                IntPtr json;
                Native.Check("ft_bench", api.ft_bench(ref p, out json));
                try { return Native.Utf8(json); }
                finally { api.ft_string_free(json); }
            }
            finally
            {
                foreach (var pin in pins) pin.Free();
            }
        }
    }
}
