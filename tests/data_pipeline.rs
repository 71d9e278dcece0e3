//! The dataset pipeline: formats, loss masks checked token by token against the rendered
//! template, packing in batches, bad records.

mod common;

use finetune::api::{Model, ModelParams};
use finetune::backend::IGNORE_LABEL;
use finetune::data::dataset::{BadRecords, Dataset, Example};
use finetune::data::encode::{LossOn, TextCodec};
use finetune::data::loader::{DataLoader, LoaderConfig};

fn codec() -> TextCodec {
    TextCodec::new(
        common::byte_tokenizer(),
        Some(common::CHATML),
        None,
        Some("<|im_end|>"),
        false,
    )
    .unwrap()
}

fn write(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

const MIXED: &str = r#"{"text": "plain words"}
{"instruction": "Add", "input": "2 and 3", "output": "5"}

{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
{"conversations": [{"from": "human", "value": "Name?"}, {"from": "gpt", "value": "Bran."}]}
"#;

#[test]
fn every_format_reads_from_jsonl_and_json_arrays() {
    let (_d, path) = write("mixed.jsonl", MIXED);
    let ds = Dataset::read(&path, BadRecords::Fail).unwrap();
    assert_eq!(ds.examples.len(), 4);
    assert_eq!(ds.lines, [1, 2, 4, 5]);
    assert!(matches!(ds.examples[0], Example::Text(_)));
    assert!(matches!(ds.examples[1], Example::PromptCompletion { .. }));
    assert!(matches!(ds.examples[3], Example::Chat(ref m) if m[1].role == "assistant"));
    let array = format!(
        "[{}]",
        MIXED
            .lines()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(",\n")
    );
    let (_d2, path2) = write("mixed.json", &array);
    assert_eq!(
        Dataset::read(&path2, BadRecords::Fail).unwrap().examples,
        ds.examples
    );
}

#[test]
fn bad_records_name_file_and_line_or_are_counted() {
    let text = "{\"text\": \"ok\"}\n{\"text\": \"broken\"\n{\"foo\": 1}\n{\"text\": \"ok too\"}\n";
    let (_d, path) = write("bad.jsonl", text);
    let e = Dataset::read(&path, BadRecords::Fail)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    let ds = Dataset::read(&path, BadRecords::Skip).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(
        ds.skipped.iter().map(|s| s.line).collect::<Vec<_>>(),
        [2, 3]
    );
    assert!(ds.skipped[1].reason.contains("\"foo\""));
}

/// Decodes the tokens whose flag is `want`, as one string.
fn decoded(c: &TextCodec, ids: &[i32], target: &[bool], want: bool) -> String {
    let picked: Vec<i32> = ids
        .iter()
        .zip(target)
        .filter(|(_, &t)| t == want)
        .map(|(&i, _)| i)
        .collect();
    c.tokenizer
        .decode(&picked.iter().map(|&i| i as u32).collect::<Vec<_>>(), false)
        .unwrap()
}

#[test]
fn loss_falls_exactly_on_assistant_tokens() {
    let c = codec();
    let (_d, path) = write("chat.jsonl", MIXED);
    let ds = Dataset::read(&path, BadRecords::Fail).unwrap();
    // Chat: the trained tokens are exactly each reply with its end-of-turn marker.
    let chat = c
        .encode_example(&ds.examples[2], LossOn::Completions)
        .unwrap();
    assert_eq!(
        decoded(&c, &chat.ids, &chat.target, true),
        "Hello!<|im_end|>\n"
    );
    let rendered = c
        .template
        .as_ref()
        .unwrap()
        .render(
            match &ds.examples[2] {
                Example::Chat(m) => m,
                _ => unreachable!(),
            },
            false,
        )
        .unwrap();
    let all: Vec<bool> = vec![true; chat.ids.len()];
    assert_eq!(
        decoded(&c, &chat.ids, &all, true),
        rendered,
        "tokens reproduce the rendered template"
    );
    assert_eq!(
        decoded(&c, &chat.ids, &chat.target, false),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Alpaca goes through the template as a user/assistant pair.
    let alpaca = c
        .encode_example(&ds.examples[1], LossOn::Completions)
        .unwrap();
    assert_eq!(
        decoded(&c, &alpaca.ids, &alpaca.target, true),
        "5<|im_end|>\n"
    );
    // Plain text: every token, then EOS.
    let text = c
        .encode_example(&ds.examples[0], LossOn::Completions)
        .unwrap();
    assert_eq!(
        decoded(&c, &text.ids, &text.target, true),
        "plain words<|im_end|>"
    );
    // Loss on everything when asked.
    let every = c.encode_example(&ds.examples[2], LossOn::All).unwrap();
    assert!(every.target.iter().all(|&t| t));
}

#[test]
fn batches_carry_shifted_labels_and_keep_packed_records_apart() {
    let c = codec();
    let (_d, path) = write("chat.jsonl", MIXED);
    let ds = Dataset::read(&path, BadRecords::Fail).unwrap();
    let encoded: Vec<_> = ds
        .examples
        .iter()
        .map(|e| c.encode_example(e, LossOn::Completions).unwrap())
        .collect();
    let lens: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    let cfg = LoaderConfig {
        max_len: 512,
        packing: true,
        batch_size: 1,
        eval_fraction: 0.0,
        seed: 1,
        pad_id: 256,
    };
    let loader = DataLoader::new(encoded.clone(), cfg).unwrap();
    let (rows, stats) = loader.epoch_rows(0);
    assert_eq!(rows.len(), 1, "all four records fit one row of 512");
    assert_eq!(rows[0].len(), lens.iter().sum::<usize>());
    assert_eq!(stats.truncated, 0);
    let b = loader.batch(&rows, 0).unwrap();
    let mut t = 0;
    for seg in 0..4 {
        let n = rows[0].segments.iter().filter(|&&s| s == seg).count();
        assert_eq!(
            b.positions[t..t + n],
            (0..n as i32).collect::<Vec<_>>()[..],
            "positions restart in segment {seg}"
        );
        assert_eq!(
            b.labels[t + n - 1],
            IGNORE_LABEL,
            "a record's last token predicts nothing"
        );
        for i in t..t + n - 1 {
            assert!(b.labels[i] == IGNORE_LABEL || b.labels[i] == b.input_ids[i + 1]);
        }
        t += n;
    }
    let trained: usize = encoded
        .iter()
        .map(|e| e.target[1..].iter().filter(|&&x| x).count())
        .sum();
    assert_eq!(
        b.labelled(),
        trained,
        "every trained token is some position's label"
    );
}

#[test]
fn a_model_directory_brings_its_tokenizer_and_template() {
    let dir = common::tiny_chat_model_dir();
    let model = Model::load(
        dir.path(),
        &ModelParams {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let c = model.codec().expect("tokenizer.json was found");
    assert_eq!(c.eos.as_ref().map(|t| t.id), Some(258));
    let msgs = [finetune::data::dataset::Message {
        role: "user".into(),
        content: "Hi".into(),
    }];
    let prompt = c.chat_prompt(&msgs).unwrap();
    assert_eq!(
        c.decode(&prompt).unwrap(),
        "system\nYou are a helpful AI assistant.\nuser\nHi\nassistant\n"
    );
}
