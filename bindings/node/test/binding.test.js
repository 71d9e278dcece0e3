'use strict';
const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');
const ft = require('..');

const ids = Array.from({ length: 12 }, (_, i) => 3 + i);
const batch = { inputIds: ids, labels: ids.map((x, i) => (i === ids.length - 1 ? ft.IGNORE_LABEL : x + 1)) };

function tiny() {
  const model = ft.Model.random('tiny', 1, { device: 'cpu', threads: 1 });
  const trainer = ft.Trainer.create(model, {
    lora: { rank: 8, alpha: 16 },
    train: { learningRate: 1e-2, totalSteps: 1000, schedule: 'constant' },
  });
  return { model, trainer };
}

test('trains off the main thread, saves, reloads and generates', async () => {
  const { model, trainer } = tiny();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ft-node-'));
  try {
    const before = trainer.evalLoss(batch);
    const seen = [];
    trainer.on('progress', (s) => seen.push(s.step));
    const last = await trainer.train([batch], { steps: 12 });
    assert.deepStrictEqual(seen, Array.from({ length: 12 }, (_, i) => i + 1));
    assert.strictEqual(last.step, 12);
    assert.ok(trainer.evalLoss(batch) < before, 'loss fell');
    trainer.saveAdapter(path.join(dir, 'adapter'));
    const reloaded = ft.Trainer.loadAdapter(model, path.join(dir, 'adapter'));
    const out = model.generate(ids.slice(0, 3), { maxNewTokens: 5, adapter: reloaded });
    assert.strictEqual(out.length, 5);
    reloaded.close();
    assert.strictEqual(model.info().vocabSize, 64);
  } finally {
    trainer.close();
    model.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// Loads the random "tiny" model with modelOpts, trains 8 steps on one batch, checks that the loss
// fell, then runs then(model) before closing both.
async function trainsTiny(modelOpts, then = () => {}) {
  const model = ft.Model.random('tiny', 1, modelOpts);
  const trainer = ft.Trainer.create(model, { train: { learningRate: 1e-2 } });
  try {
    const before = trainer.evalLoss(batch);
    await trainer.train([batch], { steps: 8 });
    assert.ok(trainer.evalLoss(batch) < before, 'loss fell');
    then(model);
  } finally {
    trainer.close();
    model.close();
  }
}

test('a model with NF4 projection matrices trains (QLoRA)', async () => {
  await trainsTiny({ device: 'cpu', threads: 1, quantization: 'nf4' });
  assert.throws(() => ft.Model.random('tiny', 1, { quantization: 'int3' }), /unknown quantization/);
});

test('the event loop keeps running while training', async () => {
  const { model, trainer } = tiny();
  let ticks = 0;
  const timer = setInterval(() => { ticks += 1; }, 2);
  const started = Date.now();
  let ticksAtFirstStep = -1;
  let ticksAtLastStep = -1;
  await trainer.train([batch], {
    steps: 60,
    onProgress: (s) => {
      if (s.step === 1) ticksAtFirstStep = ticks;
      if (s.step === 60) ticksAtLastStep = ticks;
    },
  });
  clearInterval(timer);
  const ms = Date.now() - started;
  trainer.close();
  model.close();
  assert.ok(ticksAtLastStep > ticksAtFirstStep && ticksAtFirstStep >= 0,
    `timer ticked ${ticksAtFirstStep} then ${ticksAtLastStep} times during ${ms} ms of training`);
});

test('a bad model path rejects with the library message', () => {
  const missing = path.join(os.tmpdir(), 'no-such-model-dir');
  assert.throws(() => ft.Model.load(missing), (e) => {
    assert.ok(e instanceof ft.FinetuneError && e instanceof Error);
    assert.strictEqual(e.op, 'ft_model_load');
    assert.strictEqual(e.code, 'FT_ERR_IO');
    assert.ok(e.message.includes('no-such-model-dir'), e.message);
    return true;
  });
  assert.throws(() => ft.Model.random('no-such-shape'), /no-such-shape/);
  const { model, trainer } = tiny();
  assert.throws(() => trainer.step({ inputIds: [1, 2], labels: [1] }), RangeError);
  trainer.close();
  model.close();
});

test('an AbortSignal cancels training, which keeps the steps taken', async () => {
  const { model, trainer } = tiny();
  const ac = new AbortController();
  let steps = 0;
  await assert.rejects(
    trainer.train([batch], {
      steps: 100000,
      signal: ac.signal,
      onProgress: (s) => { steps = s.step; if (s.step === 3) ac.abort(); },
    }),
    (e) => e.name === 'AbortError' && e.code === 'FT_ERR_CANCELLED' && e instanceof ft.FinetuneError,
  );
  assert.ok(steps >= 3 && steps < 100000, `stopped after ${steps} steps`);
  assert.strictEqual(trainer.step(batch).step, steps + 1);
  await assert.rejects(trainer.train([batch], { steps: 5, signal: ac.signal }), { name: 'AbortError' });
  trainer.close();
  model.close();
});

test('close is idempotent, use after close throws, close while training waits', async () => {
  const { model, trainer } = tiny();
  const running = trainer.train([batch], { steps: 5 });
  assert.throws(() => trainer.step(batch), /busy/);
  trainer.close();
  await running;
  assert.throws(() => trainer.saveAdapter(os.tmpdir()), /closed/);
  trainer.close();
  const t2 = ft.Trainer.create(model);
  model.close();
  model.close();
  assert.throws(() => model.info(), /closed/);
  assert.strictEqual(t2.step(batch).step, 1, 'a trainer outlives its model');
  t2.close();
});

test('a missing library names every place looked', () => {
  const env = { ...process.env, FINETUNE_LIB: '', LD_LIBRARY_PATH: '' };
  const script = "try { require('.').loadLibrary(); console.log('LOADED') } catch (e) { console.log(e.message) }";
  const out = execFileSync(process.execPath, ['-e', script], { cwd: path.join(__dirname, '..'), env }).toString();
  if (out.includes('LOADED')) return; // installed system-wide: nothing to check
  assert.match(out, /FINETUNE_LIB \(not set\)/);
  assert.ok(out.includes(path.join(__dirname, '..', 'libfinetune.so')), out);
  assert.ok(out.includes('/usr/local/lib/libfinetune.so (absent)'), out);
  const bad = execFileSync(process.execPath, ['-e', script], {
    cwd: path.join(__dirname, '..'), env: { ...env, FINETUNE_LIB: '/nonexistent/libfinetune.so' },
  }).toString();
  assert.match(bad, /FINETUNE_LIB=\/nonexistent\/libfinetune.so/);
});

test('the ABI version is 5 and the structs have the header\'s sizes', () => {
  assert.strictEqual(ft.ABI_VERSION, 5);
  ft.loadLibrary();
  const ffi = require('../lib/ffi');
  assert.strictEqual(ffi.load().abiVersion(), 5);
  // x86-64 sizes of the structs in include/finetune.h.
  assert.strictEqual(ffi.koffi.sizeof(ffi.ModelParams), 56);
  assert.strictEqual(ffi.koffi.sizeof(ffi.BenchParams), 72);
  assert.strictEqual(ffi.koffi.sizeof(ffi.TrainParams), 72);
  // The fields added last sit where the header puts them (the structs' tail padding would hide
  // one of another width from the sizes).
  assert.strictEqual(ffi.koffi.offsetof(ffi.ModelParams, 'lm_head_in_host_memory'), 44);
  assert.strictEqual(ffi.koffi.offsetof(ffi.ModelParams, 'layers_in_host_memory'), 48);
  assert.strictEqual(ffi.koffi.offsetof(ffi.BenchParams, 'offload_activations'), 56);
  assert.strictEqual(ffi.koffi.offsetof(ffi.BenchParams, 'lm_head_in_host_memory'), 60);
  assert.strictEqual(ffi.koffi.offsetof(ffi.BenchParams, 'layers_in_host_memory'), 64);
  assert.strictEqual(ffi.koffi.offsetof(ffi.BenchParams, 'kept_mlp_layers'), 68);
  assert.strictEqual(ffi.koffi.offsetof(ffi.TrainParams, 'kept_mlp_layers'), 68);
});

test('a library of another ABI version is refused with both versions named', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ft-node-abi-'));
  try {
    const src = path.join(dir, 'old.c');
    const lib = path.join(dir, 'libfinetune.so');
    fs.writeFileSync(src, 'unsigned ft_abi_version(void) { return 2; }\n');
    try {
      execFileSync('cc', ['-shared', '-fPIC', '-o', lib, src]);
    } catch (e) {
      t.skip('no C compiler to build a stand-in library');
      return;
    }
    const script = "try { require('.').loadLibrary(); console.log('LOADED') } catch (e) { console.log(e.message) }";
    const out = execFileSync(process.execPath, ['-e', script], {
      cwd: path.join(__dirname, '..'), env: { ...process.env, FINETUNE_LIB: lib },
    }).toString();
    assert.ok(out.includes('has C ABI version 2, this package needs 5'), out);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('process-group options are checked before loading', () => {
  const dir = path.join(os.tmpdir(), 'no-such-model-dir');
  assert.throws(() => ft.Model.load(dir, { device: 'cuda:0', worldSize: 2 }),
    (e) => e instanceof TypeError && /ncclUniqueId is missing but worldSize is 2/.test(e.message));
  assert.throws(() => ft.Model.load(dir, { device: 'cuda:0', worldSize: 2, ncclUniqueId: Buffer.alloc(5) }),
    (e) => e instanceof RangeError && /ncclUniqueId has 5 bytes; an NCCL unique id has 128/.test(e.message));
  assert.throws(() => ft.Model.random('tiny', 0, { worldSize: 2, ncclUniqueId: new Uint8Array(200) }),
    /ncclUniqueId has 200 bytes/);
  assert.throws(() => ft.Model.random('tiny', 0, { worldSize: 2, ncclUniqueId: 'abc' }),
    (e) => e instanceof TypeError && /Buffer or Uint8Array/.test(e.message));
  assert.throws(() => ft.Model.random('tiny', 0, { worldSize: -1 }), (e) => e instanceof RangeError && /worldSize/.test(e.message));
  assert.throws(() => ft.Model.random('tiny', 0, { collectiveTimeoutMs: 1.5 }), /collectiveTimeoutMs/);
  // Valid options reach the library, which reads each field where the header puts it: the rank
  // and world size it quotes, then (the id read) the device a rank needs. A Buffer slice of a
  // larger allocation serves as well.
  const id = Buffer.alloc(300).subarray(7, 7 + ft.NCCL_UNIQUE_ID_BYTES);
  assert.throws(() => ft.Model.random('tiny', 0, { device: 'cpu', worldSize: 2, rank: 5, ncclUniqueId: id, collectiveTimeoutMs: 2000 }),
    (e) => e instanceof ft.FinetuneError && e.code === 'FT_ERR_INVALID_ARGUMENT'
      && e.message.includes('rank 5 is outside a group of params->world_size 2'));
  assert.throws(() => ft.Model.random('tiny', 0, { device: 'cpu', threads: 1, worldSize: 2, rank: 1, ncclUniqueId: id }),
    (e) => e instanceof ft.FinetuneError && /rank 1 of a multi-process group/.test(e.message) && /cuda:N/.test(e.message));
  // worldSize 1 is alone: no id needed.
  ft.Model.random('tiny', 0, { device: 'cpu', threads: 1, worldSize: 1, collectiveTimeoutMs: 60000 }).close();
});

test('ncclUniqueId gives 128 bytes, or an error naming NCCL where it is absent', (t) => {
  assert.strictEqual(ft.Status.COLLECTIVE, 11);
  assert.strictEqual(require('../lib/ffi').load().statusName(ft.Status.COLLECTIVE), 'FT_ERR_COLLECTIVE');
  let id;
  try {
    id = ft.ncclUniqueId();
  } catch (e) {
    assert.ok(e instanceof ft.FinetuneError, String(e));
    assert.strictEqual(e.op, 'ft_nccl_unique_id');
    assert.match(e.message, /NCCL/);
    t.diagnostic(`no NCCL here: ${e.message}`);
    return;
  }
  assert.ok(id instanceof Uint8Array);
  assert.strictEqual(id.length, 128);
});

test('bench runs the tiny shape on the CPU and returns the JSON of finetune bench', () => {
  const d = ft.benchDefaults();
  assert.strictEqual(d.model, 'smollm2-135m');
  assert.strictEqual(d.mode, 'lora');
  assert.strictEqual(d.checkpointing, true);
  const json = ft.bench({ model: 'tiny', device: 'cpu', threads: 1, batch: 1, seq: 16, steps: 2 });
  assert.strictEqual(typeof json, 'string');
  const r = JSON.parse(json);
  assert.strictEqual(r.model, 'tiny');
  assert.strictEqual(r.steps, 2);
  assert.ok(r.tokens_per_second > 0, json);
  assert.throws(() => ft.bench({ model: 'no-such-shape', device: 'cpu' }),
    (e) => e instanceof ft.FinetuneError && e.code === 'FT_ERR_INVALID_ARGUMENT' && /no-such-shape/.test(e.message));
  assert.throws(() => ft.bench({ model: 'tiny', device: 'cpu', steps: 0 }), (e) => e.code === 'FT_ERR_INVALID_ARGUMENT');
});

test('lmHeadInHost is accepted on the CPU, where it is ignored', async () => {
  await trainsTiny({ device: 'cpu', threads: 1, lmHeadInHost: true }, (model) => {
    assert.strictEqual(model.generate(ids.slice(0, 3), { maxNewTokens: 4 }).length, 4);
  });
});

test('layersInHost reaches the library, which quotes it', () => {
  // The tiny shape has two layers: the library refuses a third, quoting the count it read.
  assert.throws(() => ft.Model.random('tiny', 0, { device: 'cpu', threads: 1, layersInHost: 3 }),
    (e) => e instanceof ft.FinetuneError && e.code === 'FT_ERR_INVALID_ARGUMENT'
      && e.message.includes('layers_in_host: 3 layers asked for; the model has 2'));
  assert.throws(() => ft.Model.random('tiny', 0, { layersInHost: -1 }),
    (e) => e instanceof RangeError && /layersInHost/.test(e.message));
  ft.Model.random('tiny', 0, { device: 'cpu', threads: 1, layersInHost: 0 }).close();
});

test('bench passes offloadActivations, lmHeadInHost, layersInHost and keptMlpLayers', () => {
  const d = ft.benchDefaults();
  assert.strictEqual(d.offloadActivations, false);
  assert.strictEqual(d.lmHeadInHost, false);
  assert.strictEqual(d.layersInHost, 0);
  assert.strictEqual(d.keptMlpLayers, 0);
  const opts = { model: 'tiny', device: 'cpu', threads: 1, batch: 1, seq: 16, steps: 1 };
  const plain = JSON.parse(ft.bench(opts));
  assert.strictEqual(plain.offload_activations, false);
  assert.strictEqual(plain.lm_head_in_host, false);
  assert.strictEqual(plain.layers_in_host, 0);
  assert.strictEqual(plain.kept_mlp_layers, 0);
  const r = JSON.parse(ft.bench({ ...opts, offloadActivations: true, lmHeadInHost: true, keptMlpLayers: 1 }));
  assert.strictEqual(r.offload_activations, true);
  assert.strictEqual(r.lm_head_in_host, true);
  assert.strictEqual(r.kept_mlp_layers, 1);
  // Both of the tiny shape's layers may stay in host memory (kept on the CPU as they are); a third is refused.
  assert.strictEqual(JSON.parse(ft.bench({ ...opts, layersInHost: 2 })).layers_in_host, 2);
  assert.throws(() => ft.bench({ ...opts, layersInHost: 3 }),
    (e) => e.code === 'FT_ERR_INVALID_ARGUMENT' && e.message.includes('layers_in_host: 3 layers asked for; the model has 2'));
  assert.throws(() => ft.bench({ ...opts, layersInHost: 1.5 }), (e) => e instanceof RangeError && /layersInHost/.test(e.message));
});
