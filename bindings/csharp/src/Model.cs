using System;
using System.Runtime.InteropServices;

namespace Finetune
{
    /// <summary>An ft_model handle, freed with ft_model_free.</summary>
    public sealed class ModelHandle : SafeHandle
    {
        public ModelHandle() : base(IntPtr.Zero, true) { }
        internal ModelHandle(IntPtr h) : base(IntPtr.Zero, true) { SetHandle(h); }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            Native.Lib.ft_model_free(handle);
            return true;
        }
    }

    /// <summary>An ft_trainer handle, freed with ft_trainer_free.</summary>
    public sealed class TrainerHandle : SafeHandle
    {
        public TrainerHandle() : base(IntPtr.Zero, true) { }
        internal TrainerHandle(IntPtr h) : base(IntPtr.Zero, true) { SetHandle(h); }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            Native.Lib.ft_trainer_free(handle);
            return true;
        }
    }

    /// <summary>Keeps a SafeHandle alive (not released by a concurrent Dispose) during a call.</summary>
    internal struct HandleLease : IDisposable
    {
        readonly SafeHandle h;
        readonly bool added;
        public readonly IntPtr Ptr;

        public HandleLease(SafeHandle handle, string what)
        {
            h = handle;
            added = false;
            Ptr = IntPtr.Zero;
            if (handle == null || handle.IsClosed) throw new ObjectDisposedException(what);
            handle.DangerousAddRef(ref added);
            Ptr = handle.DangerousGetHandle();
        }

        public void Dispose()
        {
            if (added) h.DangerousRelease();
        }
    }

    /// <summary>A frozen base model. Thread-safe; Dispose releases it (trainers made from it stay
    /// usable).</summary>
    public sealed class Model : IDisposable
    {
        /// <summary>The underlying ft_model handle.</summary>
        public ModelHandle Handle { get; private set; }

        Model(IntPtr h) { Handle = new ModelHandle(h); }

        static NativeModelParams Params(ModelOptions o, out byte[] device, out byte[] id)
        {
            var p = Native.Lib.ft_model_default_params();
            device = null;
            id = null;
            if (o != null)
            {
                p.n_threads = o.Threads;
                p.quantization = (int)o.Quantization;
                p.max_device_memory_mib = o.MaxDeviceMemoryMiB;
                p.world_size = o.WorldSize;
                p.rank = o.Rank;
                if (o.Device != null) device = Native.Utf8Z(o.Device);
                if (o.NcclUniqueId != null)
                {
                    if (o.NcclUniqueId.Length != Native.NcclUniqueIdBytes)
                        throw new ArgumentException(string.Format(
                            "ModelOptions.NcclUniqueId has {0} bytes; an NCCL unique id has {1}",
                            o.NcclUniqueId.Length, Native.NcclUniqueIdBytes), "options");
                    id = o.NcclUniqueId;
                }
                else if (o.WorldSize > 1)
                    throw new ArgumentException(string.Format(
                        "ModelOptions.NcclUniqueId is missing but WorldSize is {0}: make one with " +
                        "Library.NcclUniqueId() on one rank and give it to every rank", o.WorldSize), "options");
                double ms = Math.Ceiling(o.CollectiveTimeout.TotalMilliseconds);
                if (ms < 0 || ms > uint.MaxValue)
                    throw new ArgumentOutOfRangeException("options", o.CollectiveTimeout,
                        "ModelOptions.CollectiveTimeout must be from zero to " + uint.MaxValue + " ms");
                p.collective_timeout_ms = (uint)ms;
                p.lm_head_in_host_memory = o.LmHeadInHost ? 1 : 0;
                p.layers_in_host_memory = o.LayersInHost;
            }
            return p;
        }

        static int WithParams(ModelOptions o, Func<NativeModelParams, int> call)
        {
            byte[] device, id;
            var p = Params(o, out device, out id);
            // Pinned for the call, which reads them during the call only.
            var pins = new System.Collections.Generic.List<GCHandle>();
            try
            {
                if (device != null)
                {
                    pins.Add(GCHandle.Alloc(device, GCHandleType.Pinned));
                    p.device = pins[pins.Count - 1].AddrOfPinnedObject();
                }
                if (id != null)
                {
                    pins.Add(GCHandle.Alloc(id, GCHandleType.Pinned));
                    p.nccl_unique_id = pins[pins.Count - 1].AddrOfPinnedObject();
                }
                return call(p);
            }
            finally
            {
                foreach (var pin in pins) pin.Free();
            }
        }

        /// <summary>Loads a Hugging Face model directory (config.json + safetensors).</summary>
        public static Model Load(string path, ModelOptions options = null)
        {
            var api = Native.Lib;
            IntPtr h = IntPtr.Zero;
            var cpath = Native.Utf8Z(path);
            Native.Check("ft_model_load", WithParams(options, p => api.ft_model_load(cpath, ref p, out h)));
            return new Model(h);
        }

        /// <summary>A model of a named shape ("tiny", "smollm2-135m", ...) with random weights.</summary>
        public static Model Random(string shape, ulong seed = 0, ModelOptions options = null)
        {
            var api = Native.Lib;
            IntPtr h = IntPtr.Zero;
            var cshape = Native.Utf8Z(shape);
            Native.Check("ft_model_random", WithParams(options, p => api.ft_model_random(cshape, seed, ref p, out h)));
            return new Model(h);
        }

        public ModelInfo Info
        {
            get
            {
                using (var m = new HandleLease(Handle, "Model"))
                {
                    NativeModelInfo i;
                    Native.Check("ft_model_get_info", Native.Lib.ft_model_get_info(m.Ptr, out i));
                    return new ModelInfo
                    {
                        VocabSize = (long)i.vocab_size, HiddenSize = (long)i.hidden_size,
                        IntermediateSize = (long)i.intermediate_size, NumLayers = (long)i.num_layers,
                        NumHeads = (long)i.num_heads, NumKvHeads = (long)i.num_kv_heads, HeadDim = (long)i.head_dim,
                    };
                }
            }
        }

        /// <summary>Writes the model as a Hugging Face directory.</summary>
        public void Save(string dir, DType dtype = DType.F32)
        {
            using (var m = new HandleLease(Handle, "Model"))
                Native.Check("ft_model_save", Native.Lib.ft_model_save(m.Ptr, Native.Utf8Z(dir), (int)dtype));
        }

        /// <summary>Greedy decoding: returns up to maxNewTokens new token ids, stopping after
        /// stopToken if it is not negative; with an adapter, its LoRA weights apply.</summary>
        public int[] Generate(int[] prompt, int maxNewTokens = 16, int stopToken = -1, Trainer adapter = null)
        {
            if (prompt == null) throw new ArgumentNullException("prompt");
            var output = new int[Math.Max(maxNewTokens, 1)];
            UIntPtr n;
            using (var m = new HandleLease(Handle, "Model"))
            using (var t = adapter == null ? new HandleLease() : new HandleLease(adapter.Handle, "Trainer"))
            {
                Native.Check("ft_model_generate", Native.Lib.ft_model_generate(m.Ptr, t.Ptr, prompt,
                    (UIntPtr)prompt.Length, (UIntPtr)maxNewTokens, stopToken, output, out n));
            }
            var result = new int[(int)n];
            Array.Copy(output, result, result.Length);
            return result;
        }

        public void Dispose() { Handle.Dispose(); }
    }
}
