//! Malformed GGUF files are rejected with a message naming the file and the problem, and never
//! panic: truncation, bad magic, tensor data past the end, absurd counts and dimensions, unknown
//! types, wrong alignment, and model-level inconsistencies. Also replays the fuzz corpus.

use std::path::Path;

use finetune::api::{Model, ModelParams};
use finetune::io::gguf::{read_everything, GgufFile, GgufHeader};
use finetune::Error;

/// Builds GGUF bytes piece by piece.
#[derive(Default)]
struct Builder {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
}

fn string(s: &str) -> Vec<u8> {
    [&(s.len() as u64).to_le_bytes()[..], s.as_bytes()].concat()
}

impl Builder {
    fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        self.kv.extend(string(key));
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        self.infos.extend(string(name));
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    /// The file with `data` after padding the header to 32 bytes.
    fn bytes(&self, data: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(data);
        b
    }
}

/// One F32 tensor of 8 values with its data: a valid file.
fn valid() -> Builder {
    Builder::default()
        .kv("general.name", 8, &string("ok"))
        .tensor("t", &[8], 0, 0)
}

fn expect_error(bytes: &[u8], fragments: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).err().expect("the file is rejected");
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    check_message(&err, &path, fragments);
    assert!(read_everything(bytes).is_err());
}

fn check_message(err: &Error, path: &Path, fragments: &[&str]) {
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    for f in fragments {
        assert!(message.contains(f), "message lacks {f:?}: {message}");
    }
}

#[test]
fn a_valid_file_opens() {
    let header = GgufHeader::parse(&valid().bytes(&[0; 32])).unwrap();
    assert_eq!(header.tensor("t").unwrap().dims, [8]);
}

#[test]
fn bad_magic() {
    let mut bytes = valid().bytes(&[0; 32]);
    bytes[..4].copy_from_slice(b"GGML");
    expect_error(&bytes, &["bad magic", "not a GGUF file"]);
}

#[test]
fn unsupported_versions() {
    for v in [1u32, 4, 0x0300_0000] {
        let mut bytes = valid().bytes(&[0; 32]);
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        expect_error(&bytes, &[&format!("version {v} is not supported")]);
    }
}

#[test]
fn truncated_anywhere_in_the_header() {
    let bytes = valid().bytes(&[0; 32]);
    let header_end = bytes.len() - 32;
    for cut in [0, 3, 6, 20, 30, 45, header_end - 20] {
        expect_error(&bytes[..cut], &["truncated"]);
    }
}

#[test]
fn tensor_data_past_the_end() {
    expect_error(&valid().bytes(&[0; 31]), &["tensor \"t\"", "past the end"]);
    let far = valid().tensor("u", &[8], 0, 1 << 40);
    expect_error(&far.bytes(&[0; 64]), &["tensor \"u\"", "past the end"]);
    let overflow = valid().tensor("u", &[8], 0, u64::MAX - 31);
    expect_error(&overflow.bytes(&[0; 64]), &["absurd offset"]);
}

#[test]
fn absurd_counts() {
    let mut bytes = valid().bytes(&[0; 32]);
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_error(&bytes, &["tensor count", "absurd"]);
    let mut bytes = valid().bytes(&[0; 32]);
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_error(&bytes, &["metadata count", "absurd"]);
    // A string longer than the file.
    let long = [&u64::MAX.to_le_bytes()[..], b"x"].concat();
    expect_error(
        &Builder::default().kv("k", 8, &long).bytes(&[]),
        &["metadata \"k\"", "truncated"],
    );
    // An array of 2^62 u32 values.
    let array = [&4u32.to_le_bytes()[..], &(1u64 << 62).to_le_bytes()].concat();
    expect_error(
        &Builder::default().kv("k", 9, &array).bytes(&[]),
        &["metadata \"k\"", "claims"],
    );
}

#[test]
fn absurd_dimensions() {
    let b = Builder::default().tensor("t", &[1 << 32, 1 << 32], 0, 0);
    expect_error(&b.bytes(&[]), &["tensor \"t\"", "absurd dimensions"]);
    let b = Builder::default().tensor("t", &[1; 5], 0, 0);
    expect_error(&b.bytes(&[]), &["tensor \"t\"", "5 dimensions"]);
    let b = Builder::default().tensor("t", &[], 0, 0);
    expect_error(&b.bytes(&[]), &["tensor \"t\"", "0 dimensions"]);
}

#[test]
fn unknown_types() {
    expect_error(
        &Builder::default().tensor("t", &[32], 99, 0).bytes(&[0; 64]),
        &["tensor \"t\"", "unknown type id 99"],
    );
    expect_error(
        &Builder::default()
            .tensor("t", &[256], 10, 0)
            .bytes(&[0; 128]),
        &["tensor \"t\"", "Q2_K", "not support"],
    );
    expect_error(
        &Builder::default().kv("k", 13, &[0; 8]).bytes(&[]),
        &["metadata \"k\"", "unknown value type 13"],
    );
    let array = [&77u32.to_le_bytes()[..], &1u64.to_le_bytes()].concat();
    expect_error(
        &Builder::default().kv("k", 9, &array).bytes(&[]),
        &["unknown element type 77"],
    );
    expect_error(
        &Builder::default().kv("k", 7, &[2]).bytes(&[]),
        &["metadata \"k\"", "bool"],
    );
}

#[test]
fn wrong_alignment() {
    for a in [0u32, 3, 48, 1 << 20] {
        let b = Builder::default().kv("general.alignment", 4, &a.to_le_bytes());
        expect_error(&b.bytes(&[]), &["general.alignment", "power of two"]);
    }
    let b = Builder::default().kv("general.alignment", 10, &32u64.to_le_bytes());
    expect_error(&b.bytes(&[]), &["general.alignment"]);
    let b = Builder::default().tensor("t", &[8], 0, 4);
    expect_error(
        &b.bytes(&[0; 64]),
        &["tensor \"t\"", "offset 4", "alignment 32"],
    );
}

#[test]
fn blocks_and_duplicates() {
    let b = Builder::default().tensor("q", &[10, 2], 8, 0);
    expect_error(&b.bytes(&[0; 64]), &["tensor \"q\"", "Q8_0 blocks"]);
    let b = valid().tensor("t", &[8], 0, 32);
    expect_error(&b.bytes(&[0; 64]), &["tensor \"t\" appears twice"]);
    let b = Builder::default().kv("k", 4, &[0; 4]).kv("k", 4, &[0; 4]);
    expect_error(&b.bytes(&[]), &["\"k\" appears twice"]);
    let b = Builder::default().kv("k", 8, &[&2u64.to_le_bytes()[..], &[0xff, 0xfe]].concat());
    expect_error(&b.bytes(&[]), &["UTF-8"]);
}

#[test]
fn model_level_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let load = |bytes: Vec<u8>| {
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        (
            Model::load(&path, &ModelParams::default())
                .err()
                .expect("rejected"),
            path,
        )
    };
    let (e, path) = load(valid().bytes(&[0; 32]));
    check_message(&e, &path, &["general.architecture is missing"]);
    let (e, path) = load(
        Builder::default()
            .kv("general.architecture", 8, &string("gpt2"))
            .bytes(&[]),
    );
    check_message(&e, &path, &["unsupported architecture", "gpt2"]);
    let arch = |b: Builder| {
        let u32v = |n: u32| n.to_le_bytes();
        b.kv("general.architecture", 8, &string("llama"))
            .kv("llama.embedding_length", 4, &u32v(32))
            .kv("llama.feed_forward_length", 4, &u32v(64))
            .kv("llama.block_count", 4, &u32v(1))
            .kv("llama.attention.head_count", 4, &u32v(4))
            .kv("llama.vocab_size", 4, &u32v(8))
    };
    let (e, _) = load(arch(Builder::default()).bytes(&[]));
    assert!(
        matches!(e, Error::MissingTensor { ref name, .. } if name == "token_embd.weight"),
        "{e}"
    );
    let (e, path) = load(
        arch(Builder::default())
            .tensor("token_embd.weight", &[32, 9], 0, 0)
            .bytes(&[0; 1152]),
    );
    check_message(
        &e,
        &path,
        &["token_embd.weight", "dimensions [32, 9]", "[32, 8]"],
    );
    let (e, path) = load(
        Builder::default()
            .kv("general.architecture", 8, &string("llama"))
            .kv("llama.embedding_length", 4, &0u32.to_le_bytes())
            .bytes(&[]),
    );
    check_message(&e, &path, &["llama.embedding_length", "positive"]);
}

#[test]
fn fuzz_corpus_replays_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf_reader");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        // Ok or Err are both fine; a panic fails the test.
        let _ = read_everything(&bytes);
        n += 1;
    }
    assert!(n >= 10, "only {n} corpus files in {}", dir.display());
}
