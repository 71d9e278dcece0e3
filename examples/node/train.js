'use strict';
// Fine-tunes a model with LoRA from Node.js: load, attach adapters, train a few steps on a tiny
// counting sequence (on a worker thread, with progress events and Ctrl-C cancellation), save the
// adapter, reload it and generate a line.
//
//   FINETUNE_LIB=target/release/libfinetune.so node train.js <model_dir> <adapter_out_dir>

const { Model, Trainer, IGNORE_LABEL } = require('finetune');

async function main([modelDir, adapterDir]) {
  if (!adapterDir) {
    console.error('usage: node train.js <model_dir> <adapter_out_dir>');
    return 2;
  }
  const model = Model.load(modelDir, { device: 'cpu' });
  const trainer = Trainer.create(model, {
    lora: { rank: 8, alpha: 16 },
    train: { learningRate: 1e-2, totalSteps: 30 },
  });
  try {
    // One row counting upwards; the model learns to continue the count.
    const ids = Array.from({ length: 16 }, (_, i) => 3 + i);
    const batch = { inputIds: ids, labels: ids.map((x, i) => (i === ids.length - 1 ? IGNORE_LABEL : x + 1)) };

    const abort = new AbortController();
    process.once('SIGINT', () => abort.abort());
    let first;
    trainer.on('progress', (s) => {
      first ??= s.loss;
      if (s.step % 10 === 0) console.log(`step ${s.step}  loss ${s.loss.toFixed(4)}`);
    });
    const last = await trainer.train([batch], { steps: 30, signal: abort.signal });
    console.log(`loss ${first.toFixed(4)} -> ${last.loss.toFixed(4)}`);

    trainer.saveAdapter(adapterDir);
    console.log(`saved adapter to ${adapterDir}`);
    const reloaded = Trainer.loadAdapter(model, adapterDir);
    const out = model.generate(ids.slice(0, 3), { maxNewTokens: 8, adapter: reloaded });
    reloaded.close();
    console.log(`generated: ${out.join(' ')}`);
    return last.loss < first ? 0 : 1;
  } finally {
    trainer.close();
    model.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => { console.error(err.message); process.exitCode = 1; },
);
