'use strict';
// Runs ft_trainer_train on a worker thread so the main thread's event loop stays free. Progress
// goes back as messages; cancellation comes in through a shared flag the callback reads.

const { parentPort, workerData } = require('worker_threads');
const ffi = require('./ffi');

const { libPath, trainer, batches, steps, cancelFlag } = workerData;
const api = ffi.load(libPath);
const cancel = new Int32Array(cancelFlag);

const progress = (statsPtr) => {
  parentPort.postMessage({ type: 'progress', stats: ffi.statsOf(ffi.koffi.decode(statsPtr, ffi.StepStats)) });
  return Atomics.load(cancel, 0) !== 0 ? 1 : 0;
};
const cb = ffi.koffi.register(progress, ffi.koffi.pointer(ffi.ProgressFn));
try {
  const cBatches = ffi.toCBatches(batches);
  const status = api.trainerTrainAt(trainer, cBatches, cBatches.length, steps, cb, null);
  parentPort.postMessage({
    type: 'done', status, name: api.statusName(status), message: status === 0 ? '' : api.lastError(),
  });
} finally {
  ffi.koffi.unregister(cb);
}
