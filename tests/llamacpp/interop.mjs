// Runs llama.cpp (the prebuilt binaries of node-llama-cpp) on a list of jobs and prints the
// results as JSON, for tests/gguf_llamacpp.rs and tests/gguf_types_llamacpp.rs to compare with
// this library's.
//
// Usage: node interop.mjs jobs.json
// jobs.json: [{"model": "a.gguf", "lora": "adapter.gguf" | null,
//              "tokenize": ["text", ...], "prompts": [[ids], ...], "n_predict": 16,
//              "score": [[ids], ...]}, ...]
// Output:    [{"tokens": [[ids], ...], "continuations": [[ids], ...],
//              "log_probs": [[[vocab floats] per position] per sequence of "score"]}, ...]
// "score" evaluates each sequence once and returns, at every position, the log-softmax of the
// logits over the whole vocabulary (greedy sampling applies no penalty, top-k or temperature).
import { readFileSync } from "node:fs";
import { getLlama } from "node-llama-cpp";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({ gpu: false, build: "never", progressLogs: false, logLevel: "error" });
const results = [];
for (const job of jobs) {
    const model = await llama.loadModel({ modelPath: job.model });
    const tokens = (job.tokenize ?? []).map((text) => Array.from(model.tokenize(text)));
    const continuations = [];
    if ((job.prompts ?? []).length > 0) {
        const lora = job.lora ? { adapters: [{ filePath: job.lora, scale: 1 }] } : undefined;
        const context = await model.createContext({ contextSize: 512, threads: 2, lora });
        for (const prompt of job.prompts) {
            const sequence = context.getSequence();
            const out = [];
            // temperature 0: the arg-max token at every step.
            for await (const token of sequence.evaluate(prompt, { temperature: 0 })) {
                out.push(token);
                if (out.length >= job.n_predict) break;
            }
            continuations.push(out);
            sequence.dispose();
        }
        await context.dispose();
    }
    const log_probs = [];
    if ((job.score ?? []).length > 0) {
        // One sequence each: a disposed sequence is not free for reuse at once.
        const context = await model.createContext({
            contextSize: 512, threads: 2, sequences: job.score.length,
        });
        for (const sequenceIds of job.score) {
            const sequence = context.getSequence();
            const input = sequenceIds.map((t) => [t, { generateNext: { probabilities: true } }]);
            const outputs = await sequence.controlledEvaluate(input);
            log_probs.push(outputs.map((out) => {
                const row = [];
                for (const [token, p] of out.next.probabilities) row[token] = Math.log(p);
                return row;
            }));
            sequence.dispose();
        }
        await context.dispose();
    }
    results.push({ tokens, continuations, log_probs });
    await model.dispose();
}
process.stdout.write(JSON.stringify(results));
