//! Token ids equal transformers' CLIPTokenizer on hundreds of varied prompts.

use crate::common;

use sdxld::engine::models::tokenizer::ClipTokenizer;
use serde_json::Value;

fn reference() -> Value {
    let path = common::fixtures().join("tokens.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("tokens.json")).expect("json")
}

fn check(tokenizer: &ClipTokenizer, reference: &Value, key: &str, what: &str) {
    let prompts = reference["prompts"].as_array().expect("prompts");
    let expected = reference[key].as_array().expect("ids");
    assert!(prompts.len() >= 500, "only {} prompts", prompts.len());
    for (prompt, ids) in prompts.iter().zip(expected) {
        let prompt = prompt.as_str().expect("string");
        let ids: Vec<i64> = ids
            .as_array()
            .expect("list")
            .iter()
            .map(|v| v.as_i64().expect("id"))
            .collect();
        assert_eq!(
            tokenizer.encode(prompt).expect("encode"),
            ids,
            "{what}: prompt {prompt:?}"
        );
    }
}

#[test]
fn tokenizer_json_folders_match_transformers() {
    let reference = reference();
    let pipeline = common::fixtures().join("tiny2/pipeline");
    let tok = ClipTokenizer::from_dir(&pipeline.join("tokenizer")).expect("tokenizer");
    check(
        &tok,
        &reference,
        "pad_eos",
        "tokenizer.json, pad <|endoftext|>",
    );
    let tok = ClipTokenizer::from_dir(&pipeline.join("tokenizer_2")).expect("tokenizer_2");
    check(&tok, &reference, "pad_bang", "tokenizer.json, pad !");
}

#[test]
fn vocab_and_merges_folders_match_transformers() {
    let reference = reference();
    let pipeline = common::fixtures().join("tiny3/pipeline");
    assert!(!pipeline.join("tokenizer/tokenizer.json").exists());
    let tok = ClipTokenizer::from_dir(&pipeline.join("tokenizer")).expect("tokenizer");
    check(&tok, &reference, "pad_eos", "vocab.json, pad <|endoftext|>");
    let tok = ClipTokenizer::from_dir(&pipeline.join("tokenizer_2")).expect("tokenizer_2");
    check(&tok, &reference, "pad_bang", "vocab.json, pad !");
}

#[test]
fn clip_bpe_vocabulary_file_matches_transformers() {
    let reference = reference();
    let gz = common::fixtures().join("clip_vocab/bpe_simple_vocab_16e6.txt.gz");
    let tok = ClipTokenizer::from_bpe_gz(&gz, "<|endoftext|>").expect("bpe");
    check(&tok, &reference, "pad_eos", "bpe file, pad <|endoftext|>");
    let tok = ClipTokenizer::from_bpe_gz(&gz, "!").expect("bpe");
    check(&tok, &reference, "pad_bang", "bpe file, pad !");
}

#[test]
fn known_prompt_gives_known_ids() {
    let gz = common::fixtures().join("clip_vocab/bpe_simple_vocab_16e6.txt.gz");
    let tok = ClipTokenizer::from_bpe_gz(&gz, "<|endoftext|>").expect("bpe");
    let ids = tok
        .encode("a photo of an astronaut riding a horse")
        .expect("encode");
    assert_eq!(
        &ids[..10],
        &[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    );
    assert_eq!(ids.len(), 77);
    assert_eq!(tok.overflow(&"word ".repeat(100)), 25);
}
