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

test('a model with NF4 projection matrices trains (QLoRA)', async () => {
  const model = ft.Model.random('tiny', 1, { device: 'cpu', threads: 1, quantization: 'nf4' });
  const trainer = ft.Trainer.create(model, { train: { learningRate: 1e-2 } });
  try {
    const before = trainer.evalLoss(batch);
    await trainer.train([batch], { steps: 8 });
    assert.ok(trainer.evalLoss(batch) < before, 'loss fell');
  } finally {
    trainer.close();
    model.close();
  }
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
