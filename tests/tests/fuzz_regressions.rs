//! Replays every checked-in fuzz input — the seed corpus and each input a
//! fuzzer found (`fuzz/regressions/`) — through the fuzz targets' bodies,
//! so a finding, once fixed, stays fixed in the ordinary tests. The long
//! runs are `scripts/fuzz` (README, "Fuzzing").

use std::path::{Path, PathBuf};

use memsock_proto::control::{ClientMessage, FrameError, FrameReader, Framed, ServerMessage};
use memsock_tests::fuzz;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = ["seeds", "regressions"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(root.join(dir).join(target)).ok())
        .flatten()
        .map(|entry| entry.expect("readable directory").path())
        .filter(|path| path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

/// Runs `body` on every input of `target`, of which there are at least `min`.
fn replay(target: &str, min: usize, body: fn(&[u8])) {
    let files = inputs(target);
    assert!(files.len() >= min, "the seed corpus is checked in: {files:?}");
    for file in files {
        body(&std::fs::read(&file).expect("readable"));
    }
}

#[test]
fn control_decoder_inputs_replay() {
    replay("control_decoder", 4, fuzz::control_decoder);
}

#[test]
fn segment_open_inputs_replay() {
    replay("segment_open", 5, fuzz::segment_open);
}

/// The seeds are real sessions in this protocol version: each decodes
/// whole into messages (regenerate them with `memsock-capture-session`
/// when the protocol changes, as the failure says).
#[test]
fn control_seeds_are_sessions_of_this_protocol() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    for file in inputs("control_decoder").iter().filter(|f| f.starts_with(&seeds)) {
        let bytes = std::fs::read(file).expect("readable");
        let name = file.file_name().unwrap().to_string_lossy();
        let decoded = if name.ends_with("-client") {
            count::<ClientMessage>(&bytes[1..])
        } else {
            count::<ServerMessage>(&bytes[1..])
        };
        match decoded {
            Ok(n) => assert!(n >= 3, "{name}: only {n} messages"),
            Err(e) => panic!(
                "{name} no longer decodes ({e}): regenerate the seeds with \
                 `cargo run -p memsock-tests --profile ci --bin memsock-capture-session -- fuzz/seeds/control_decoder fuzz/seeds/segment_open`"
            ),
        }
    }
}

/// Messages in `bytes`, counting those whose descriptors did not come
/// along (a recording keeps the bytes only).
fn count<T: Framed>(bytes: &[u8]) -> Result<usize, FrameError> {
    let mut reader = FrameReader::<T>::new();
    reader.push(bytes);
    let mut n = 0;
    loop {
        match reader.next_message() {
            Ok(Some(_)) | Err(FrameError::MissingDescriptors { .. }) => n += 1,
            Ok(None) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}
