// The C API of libfinetune (include/finetune.h): struct layouts, and the entry points resolved at
// run time with dlopen/dlsym so that FINETUNE_LIB and the search below work on Mono and .NET alike.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;

namespace Finetune
{
    // Field for field, in order, as in include/finetune.h: a struct shorter than the library's
    // would let it read past the end (the tests check the sizes).
    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeModelParams
    {
        public IntPtr device;
        public uint n_threads;
        public int quantization;
        public ulong max_device_memory_mib;
        public uint world_size;
        public uint rank;
        public IntPtr nccl_unique_id;
        public uint collective_timeout_ms;
        public int lm_head_in_host_memory;
        public uint layers_in_host_memory;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeBenchParams
    {
        public IntPtr model, mode;
        public uint batch, seq, rank, steps;
        public int checkpointing;
        public uint n_threads;
        public IntPtr device;
        public ulong max_device_memory_mib;
        public int offload_activations;
        public int lm_head_in_host_memory;
        public uint layers_in_host_memory;
        public uint kept_mlp_layers;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeModelInfo
    {
        public ulong vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeLoraParams
    {
        public uint rank;
        public float alpha;
        public int use_rslora;
        public float dropout;
        public uint target_modules;
        public ulong seed;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeTrainParams
    {
        public float learning_rate, weight_decay, beta1, beta2, eps, max_grad_norm;
        public int schedule;
        public ulong warmup_steps, total_steps;
        public int gradient_checkpointing;
        public ulong seed;
        public int offload_activations;
        public uint kept_mlp_layers;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeBatch
    {
        public IntPtr input_ids, labels, positions, segment_ids;
        public uint batch_size, seq_len;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeStepStats
    {
        public ulong step;
        public float loss, grad_norm, learning_rate;
        public ulong tokens, labelled_tokens;
    }

    internal static class Native
    {
        public const string LibraryEnv = "FINETUNE_LIB";
        const string LibName = "libfinetune.so";
        public const uint AbiVersion = 5;
        public const int NcclUniqueIdBytes = 128;

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate uint AbiVersionFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr StringFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr StatusNameFn(int status);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate NativeModelParams ModelDefaultsFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate NativeLoraParams LoraDefaultsFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate NativeTrainParams TrainDefaultsFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int ModelLoadFn(byte[] path, ref NativeModelParams p, out IntPtr model);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int ModelRandomFn(byte[] shape, ulong seed, ref NativeModelParams p, out IntPtr model);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int ModelGetInfoFn(IntPtr model, out NativeModelInfo info);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int ModelSaveFn(IntPtr model, byte[] dir, int dtype);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int ModelGenerateFn(IntPtr model, IntPtr trainer, int[] prompt, UIntPtr nPrompt, UIntPtr maxNew, int stop, int[] output, out UIntPtr nOut);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate void FreeFn(IntPtr handle);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerNewFn(IntPtr model, ref NativeLoraParams lora, ref NativeTrainParams train, out IntPtr trainer);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerLoadAdapterFn(IntPtr model, byte[] dir, ref NativeTrainParams train, out IntPtr trainer);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerStepFn(IntPtr trainer, NativeBatch[] batches, UIntPtr n, out NativeStepStats stats);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int ProgressFn(IntPtr stats, IntPtr user);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerTrainFn(IntPtr trainer, NativeBatch[] batches, UIntPtr n, ulong steps, ProgressFn progress, IntPtr user);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerEvalLossFn(IntPtr trainer, NativeBatch[] batch, out float loss);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerWriteFn(IntPtr trainer, byte[] dir);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int TrainerExportFn(IntPtr trainer, byte[] dir, int dtype);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int NcclUniqueIdFn([Out] byte[] output, UIntPtr outLen);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate NativeBenchParams BenchDefaultsFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int BenchFn(ref NativeBenchParams p, out IntPtr json);

        // Filled by reflection in Bind().
#pragma warning disable 649
        public sealed class Api
        {
            public string Path;
            public AbiVersionFn ft_abi_version;
            public StringFn ft_version, ft_last_error;
            public StatusNameFn ft_status_name;
            public ModelDefaultsFn ft_model_default_params;
            public LoraDefaultsFn ft_lora_default_params;
            public TrainDefaultsFn ft_train_default_params;
            public ModelLoadFn ft_model_load;
            public ModelRandomFn ft_model_random;
            public ModelGetInfoFn ft_model_get_info;
            public ModelSaveFn ft_model_save;
            public ModelGenerateFn ft_model_generate;
            public FreeFn ft_model_free, ft_trainer_free, ft_string_free;
            public TrainerNewFn ft_trainer_new;
            public TrainerLoadAdapterFn ft_trainer_load_adapter;
            public TrainerStepFn ft_trainer_step;
            public TrainerTrainFn ft_trainer_train;
            public TrainerEvalLossFn ft_trainer_eval_loss;
            public TrainerWriteFn ft_trainer_save_adapter;
            public TrainerExportFn ft_trainer_export_merged;
            public NcclUniqueIdFn ft_nccl_unique_id;
            public BenchDefaultsFn ft_bench_default_params;
            public BenchFn ft_bench;
        }
#pragma warning restore 649

        static readonly object gate = new object();
        static Api api;

        /// <summary>The loaded library, opened on first use.</summary>
        public static Api Lib
        {
            get
            {
                lock (gate)
                {
                    if (api == null) api = Open();
                    return api;
                }
            }
        }

        // dlopen lives in libdl.so.2 (glibc before 2.34; a stub after) and libc.so.6 (2.34 on).
        static class LibDl
        {
            [DllImport("libdl.so.2")] public static extern IntPtr dlopen(string file, int mode);
            [DllImport("libdl.so.2")] public static extern IntPtr dlsym(IntPtr handle, string name);
            [DllImport("libdl.so.2")] public static extern IntPtr dlerror();
        }

        static class LibC
        {
            [DllImport("libc.so.6")] public static extern IntPtr dlopen(string file, int mode);
            [DllImport("libc.so.6")] public static extern IntPtr dlsym(IntPtr handle, string name);
            [DllImport("libc.so.6")] public static extern IntPtr dlerror();
        }

        static bool useLibC;
        const int RTLD_NOW = 2;

        static IntPtr DlOpen(string file, out string error)
        {
            IntPtr h;
            try
            {
                h = useLibC ? LibC.dlopen(file, RTLD_NOW) : LibDl.dlopen(file, RTLD_NOW);
            }
            catch (DllNotFoundException)
            {
                useLibC = true;
                h = LibC.dlopen(file, RTLD_NOW);
            }
            error = h == IntPtr.Zero ? Utf8(useLibC ? LibC.dlerror() : LibDl.dlerror()) : null;
            return h;
        }

        static IntPtr DlSym(IntPtr lib, string name)
        {
            return useLibC ? LibC.dlsym(lib, name) : LibDl.dlsym(lib, name);
        }

        /// <summary>Where the library is looked for when FINETUNE_LIB is not set, in order.</summary>
        internal static List<string> Candidates()
        {
            var dirs = new List<string>();
            string asm = typeof(Native).Assembly.Location;
            if (!string.IsNullOrEmpty(asm)) dirs.Add(System.IO.Path.GetDirectoryName(asm));
            dirs.Add(AppDomain.CurrentDomain.BaseDirectory);
            foreach (var d in (Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "").Split(':'))
                if (d.Length > 0) dirs.Add(d);
            dirs.AddRange(new[] { "/usr/local/lib", "/usr/lib", "/usr/lib/x86_64-linux-gnu" });
            var paths = new List<string>();
            foreach (var d in dirs)
            {
                var p = System.IO.Path.Combine(d, LibName);
                if (!paths.Contains(p)) paths.Add(p);
            }
            return paths;
        }

        static Api Open()
        {
            string error;
            string env = Environment.GetEnvironmentVariable(LibraryEnv);
            if (!string.IsNullOrEmpty(env))
            {
                IntPtr h = DlOpen(env, out error);
                if (h == IntPtr.Zero)
                    throw new DllNotFoundException(string.Format(
                        "finetune: cannot load the library named by {0}={1}: {2}", LibraryEnv, env, error));
                return Bind(h, env);
            }
            var looked = new List<string> { LibraryEnv + " (not set)" };
            foreach (var p in Candidates())
            {
                if (!File.Exists(p)) { looked.Add(p + " (absent)"); continue; }
                IntPtr h = DlOpen(p, out error);
                if (h != IntPtr.Zero) return Bind(h, p);
                looked.Add(p + " (" + error + ")");
            }
            IntPtr sys = DlOpen(LibName, out error);
            if (sys != IntPtr.Zero) return Bind(sys, LibName);
            looked.Add("the dynamic linker's search path");
            throw new DllNotFoundException(string.Format(
                "finetune: {0} not found; set {1} to its full path. Looked in: {2}",
                LibName, LibraryEnv, string.Join(", ", looked)));
        }

        static Api Bind(IntPtr lib, string path)
        {
            var a = new Api { Path = path };
            Func<string, IntPtr> symbol = name =>
            {
                IntPtr sym = DlSym(lib, name);
                if (sym == IntPtr.Zero)
                    throw new EntryPointNotFoundException(string.Format(
                        "finetune: {0} has no symbol {1} (a different library?)", path, name));
                return sym;
            };
            // The version first: a library of another ABI may lack some of the other symbols, and
            // its version is the clearer message.
            var abiVersion = (AbiVersionFn)Marshal.GetDelegateForFunctionPointer(symbol("ft_abi_version"), typeof(AbiVersionFn));
            uint abi = abiVersion();
            if (abi != AbiVersion)
                throw new DllNotFoundException(string.Format(
                    "finetune: {0} has C ABI version {1}, this binding needs {2}", path, abi, AbiVersion));
            foreach (var f in typeof(Api).GetFields())
            {
                if (f.FieldType == typeof(string)) continue;
                f.SetValue(a, Marshal.GetDelegateForFunctionPointer(symbol(f.Name), f.FieldType));
            }
            return a;
        }

        /// <summary>A NUL-terminated UTF-8 copy of s.</summary>
        public static byte[] Utf8Z(string s)
        {
            if (s == null) throw new ArgumentNullException();
            var bytes = new byte[System.Text.Encoding.UTF8.GetByteCount(s) + 1];
            System.Text.Encoding.UTF8.GetBytes(s, 0, s.Length, bytes, 0);
            return bytes;
        }

        public static string Utf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return System.Text.Encoding.UTF8.GetString(bytes);
        }

        /// <summary>Throws for a failed status, with ft_last_error read at once on this thread.</summary>
        public static void Check(string op, int status)
        {
            if (status == 0) return;
            var a = Lib;
            string message = Utf8(a.ft_last_error());
            throw new FinetuneException(op, (Status)status, Utf8(a.ft_status_name(status)), message);
        }
    }
}
