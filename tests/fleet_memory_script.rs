//! `scripts/bench-fleet-memory --fold` reads two massif snapshots and folds their difference per
//! agent into categories. These tests run it on snapshots in massif's format, with frames copied
//! from a real run (docs/design.md, decision 95), and check the per-agent arithmetic and that the
//! innermost matching frame decides: a task whose type names rustls and `lanyard::net` is the
//! connection task, and h2's buffer allocated through `bytes` is h2's.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A massif file with one detailed snapshot of `heap` bytes (`extra` of allocator overhead).
fn snapshot(dir: &Path, name: &str, heap: u64, extra: u64, tree: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "desc: --tool=massif\ncmd: lanyard serve\ntime_unit: i\n#-----------\nsnapshot=0\n#-----------\ntime=1\nmem_heap_B={heap}\nmem_heap_extra_B={extra}\nmem_stacks_B=0\nheap_tree=detailed\n{tree}"
        ),
    )
    .unwrap();
    path
}

const BEFORE: &str = "\
n1: 1040 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n0: 1040 in 3 places, below massif's threshold (0.01%)
";

const AFTER: &str = "\
n4: 52000 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n1: 32768 0x99B8B5: UnknownInlinedFun (library/alloc/src/alloc.rs:95)
  n1: 32768 0x99B8B5: with_capacity (src/bytes_mut.rs:162)
   n1: 32768 0x99B8B5: h2::codec::framed_write::FramedWrite<T,B>::new (src/codec/framed_write.rs:96)
    n0: 32768 0x92334E: h2::codec::Codec<T,B>::with_max_recv_frame_size (src/codec/mod.rs:42)
 n1: 10000 0x7B4A04: tokio::runtime::task::core::Cell<T,S>::new (src/runtime/task/core.rs:261)
  n0: 10000 0x7B4A04: with_current<tokio::task::spawn::spawn_inner::{closure_env#0}<tonic::transport::server::serve_connection::{async_block_env#0}<tonic::body::Body, hyper_util::rt::tokio::TokioIo<tonic::transport::server::service::io::ServerIo<lanyard::net::Conn<tokio_rustls::server::TlsStream<tokio::net::tcp::stream::TcpStream>>>>>>> (src/runtime/context/current.rs:59)
 n1: 8192 0x126A0CB: prepare_read (buffers.rs:245)
  n0: 8192 0x126A0CB: rustls::msgs::deframer::buffers::DeframerVecBuffer::read (buffers.rs:200)
 n0: 1040 in 7 places, below massif's threshold (0.01%)
";

#[test]
fn fold_divides_the_difference_per_agent_and_the_innermost_frame_decides() {
    if !common::require_python3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let before = snapshot(dir.path(), "before.massif", 1040, 0, BEFORE);
    let after = snapshot(dir.path(), "after.massif", 52000, 200, AFTER);
    let out = Command::new("python3")
        .arg(repo().join("scripts/bench-fleet-memory"))
        .args([
            "--fold",
            before.to_str().unwrap(),
            after.to_str().unwrap(),
            "2",
        ])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (52,000 - 1,040) / 2 agents; overhead 200 / 2.
    assert!(
        text.contains("CA heap per connected agent: 25.5 KB"),
        "{text}"
    );
    assert!(text.contains("allocator overhead 0.1 KB"), "{text}");
    for row in [
        "| 16,384 | h2 write buffer",
        "| 5,000 | connection task",
        "| 4,096 | rustls record buffer",
    ] {
        assert!(text.contains(row), "no {row:?} in\n{text}");
    }
    // The task's type names rustls and lanyard::net, and the below-threshold bytes did not
    // change: none of these rows may appear.
    for wrong in [
        "rustls connection state",
        "lanyard connection state",
        "other (below",
    ] {
        assert!(!text.contains(wrong), "{wrong:?} in\n{text}");
    }
}
