using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Threading;
using System.Threading.Tasks;

namespace Finetune
{
    /// <summary>LoRA adapters and their optimizer over a model. Calls on one trainer run one at a
    /// time (they lock it). Dispose releases it, after a training run in progress ends.</summary>
    public sealed class Trainer : IDisposable
    {
        /// <summary>The underlying ft_trainer handle.</summary>
        public TrainerHandle Handle { get; private set; }
        readonly object gate = new object();

        /// <summary>Raised after each training step, on the thread that trains.</summary>
        public event EventHandler<StepEventArgs> Progress;

        Trainer(IntPtr h) { Handle = new TrainerHandle(h); }

        /// <summary>Fresh adapters on model; null options keep the library's defaults.</summary>
        public static Trainer Create(Model model, LoraOptions lora = null, TrainOptions train = null)
        {
            var l = (lora ?? new LoraOptions()).ToNative();
            var t = (train ?? new TrainOptions()).ToNative();
            IntPtr h;
            using (var m = new HandleLease(model.Handle, "Model"))
                Native.Check("ft_trainer_new", Native.Lib.ft_trainer_new(m.Ptr, ref l, ref t, out h));
            return new Trainer(h);
        }

        /// <summary>A PEFT adapter directory loaded onto model.</summary>
        public static Trainer LoadAdapter(Model model, string dir, TrainOptions train = null)
        {
            var t = (train ?? new TrainOptions()).ToNative();
            IntPtr h;
            using (var m = new HandleLease(model.Handle, "Model"))
                Native.Check("ft_trainer_load_adapter", Native.Lib.ft_trainer_load_adapter(m.Ptr, Native.Utf8Z(dir), ref t, out h));
            return new Trainer(h);
        }

        /// <summary>One optimizer step over the micro-batches (gradient accumulation).</summary>
        public StepStats Step(params Batch[] batches)
        {
            lock (gate)
            using (var t = new HandleLease(Handle, "Trainer"))
            using (var b = new PinnedBatches(batches))
            {
                NativeStepStats s;
                Native.Check("ft_trainer_step", Native.Lib.ft_trainer_step(t.Ptr, b.Native, (UIntPtr)b.Native.Length, out s));
                return StepStats.From(s);
            }
        }

        /// <summary>Trains steps steps on this thread, step i on batches[i % Count], raising Progress
        /// after each. Cancelling the token stops after the step in flight (the steps taken stay
        /// applied) with an OperationCanceledException. Returns the last step's stats.</summary>
        public StepStats Train(IList<Batch> batches, ulong steps, CancellationToken cancellationToken = default(CancellationToken), IProgress<StepStats> progress = null)
        {
            cancellationToken.ThrowIfCancellationRequested();
            StepStats last = null;
            Exception callbackError = null;
            Native.ProgressFn cb = (statsPtr, user) =>
            {
                try
                {
                    last = StepStats.From((NativeStepStats)Marshal.PtrToStructure(statsPtr, typeof(NativeStepStats)));
                    if (progress != null) progress.Report(last);
                    var handler = Progress;
                    if (handler != null) handler(this, new StepEventArgs(last));
                }
                catch (Exception e)
                {
                    // An exception must not unwind through the library: stop, and rethrow below.
                    callbackError = e;
                    return 1;
                }
                return cancellationToken.IsCancellationRequested ? 1 : 0;
            };
            lock (gate)
            using (var t = new HandleLease(Handle, "Trainer"))
            using (var b = new PinnedBatches(batches))
            {
                int status = Native.Lib.ft_trainer_train(t.Ptr, b.Native, (UIntPtr)b.Native.Length, steps, cb, IntPtr.Zero);
                GC.KeepAlive(cb);
                if (callbackError != null) throw new ProgressHandlerException(callbackError);
                try
                {
                    Native.Check("ft_trainer_train", status);
                }
                catch (FinetuneException e)
                {
                    if (e.Status == Status.Cancelled && cancellationToken.IsCancellationRequested)
                        throw new OperationCanceledException(e.Message, e, cancellationToken);
                    throw;
                }
            }
            return last;
        }

        /// <summary>Train on a thread of its own, as a Task. Progress is raised on that thread;
        /// cancellation makes the task Canceled.</summary>
        public Task<StepStats> TrainAsync(IList<Batch> batches, ulong steps, CancellationToken cancellationToken = default(CancellationToken), IProgress<StepStats> progress = null)
        {
            return Task.Factory.StartNew(() => Train(batches, steps, cancellationToken, progress),
                cancellationToken, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }

        /// <summary>Mean loss on one batch with the current adapters, without updating them.</summary>
        public float EvalLoss(Batch batch)
        {
            lock (gate)
            using (var t = new HandleLease(Handle, "Trainer"))
            using (var b = new PinnedBatches(new[] { batch }))
            {
                float loss;
                Native.Check("ft_trainer_eval_loss", Native.Lib.ft_trainer_eval_loss(t.Ptr, b.Native, out loss));
                return loss;
            }
        }

        /// <summary>Writes the adapters in PEFT's format into dir.</summary>
        public void SaveAdapter(string dir)
        {
            lock (gate)
            using (var t = new HandleLease(Handle, "Trainer"))
                Native.Check("ft_trainer_save_adapter", Native.Lib.ft_trainer_save_adapter(t.Ptr, Native.Utf8Z(dir)));
        }

        /// <summary>Writes the base model with the adapters merged, as a Hugging Face directory.</summary>
        public void ExportMerged(string dir, DType dtype = DType.F32)
        {
            lock (gate)
            using (var t = new HandleLease(Handle, "Trainer"))
                Native.Check("ft_trainer_export_merged", Native.Lib.ft_trainer_export_merged(t.Ptr, Native.Utf8Z(dir), (int)dtype));
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>An exception thrown by a Progress handler, carried out of the training call.</summary>
    public sealed class ProgressHandlerException : Exception
    {
        public ProgressHandlerException(Exception inner)
            : base("a progress handler threw: " + inner.Message, inner) { }
    }
}
