//! Feeds arbitrary bytes to the GGUF reader: header, every tensor, configuration and tokenizer.
//! Any panic, overflow or out-of-memory is a finding. Run with
//! `cargo fuzz run gguf_reader fuzz/corpus/gguf_reader` (nightly).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = finetune::io::gguf::read_everything(data);
});
