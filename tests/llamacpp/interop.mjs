// Runs llama.cpp (the prebuilt binaries of node-llama-cpp) on a list of jobs and prints the
// results as JSON, for tests/gguf_llamacpp.rs to compare with this library's.
//
// Usage: node interop.mjs jobs.json
// jobs.json: [{"model": "a.gguf", "lora": "adapter.gguf" | null,
//              "tokenize": ["text", ...], "prompts": [[ids], ...], "n_predict": 16}, ...]
// Output:    [{"tokens": [[ids], ...], "continuations": [[ids], ...]}, ...]
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
    results.push({ tokens, continuations });
    await model.dispose();
}
process.stdout.write(JSON.stringify(results));
