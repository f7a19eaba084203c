//! Hostile peers against a real `bus broker`: protocol clients written from docs/protocol.md
//! that follow the handshake far enough to get their own segments, then write anything they
//! like into them; datagram floods; resource exhaustion; limits at their edges. Honest peers
//! (bus-client, `bus pub`/`bus sub`) must keep working and lose nothing.
//!
//! Every broker test runs once per driver (`epoll`, `uring`, forced with MEMBUS_DRIVER); test
//! names carry the item number. Randomised sizes print their seed (`HOSTILE_SEED=N`
//! replays one). Waits poll against a 20 s deadline; nothing asserts speed.

#![allow(dead_code)]

mod delivery;
mod honest;
mod limits;
mod memory;
mod peer;
mod support;

use delivery::End;
use memory::{Cursor, Lie};

/// One test per driver for each `name => fn(driver)`.
macro_rules! per_driver {
    ($($name:ident => $body:expr),* $(,)?) => {
        mod epoll {
            use super::*;
            $( #[test] fn $name() { let f: fn(&str) = $body; f("epoll") } )*
        }
        mod uring {
            use super::*;
            $( #[test] fn $name() { let f: fn(&str) = $body; f("uring") } )*
        }
    };
}

// After the macro: the review's tests use it too.
mod review;

per_driver!(
    item01_backlog_then_close_publisher_delivers_all => |d| delivery::backlog_at_close(d, End::Close, false),
    item01_backlog_then_disconnect_delivers_all => |d| delivery::backlog_at_close(d, End::Disconnect, false),
    item01_backlog_then_close_with_datagram_subscriber => |d| delivery::backlog_at_close(d, End::Close, true),
    item01_backlog_then_disconnect_with_datagram_subscriber => |d| delivery::backlog_at_close(d, End::Disconnect, true),
    item02_concurrent_datagram_and_shm_publishers_lose_nothing => delivery::concurrent_publishers,
    item02_publishers_come_and_go_lose_nothing => delivery::churning_publishers,
    item04_ring_size_overflow_is_too_large_and_leaks_no_topic => limits::ring_size_overflow,
    item05_fd_exhaustion_is_limit_reached_and_others_keep_working => limits::fd_exhaustion,
    item05_connection_flood_does_not_spin_broker => limits::connection_flood,
    item06_more_than_4096_subscribers_per_topic_refused_at_start => limits::too_many_subscribers_per_ring,
    item07_claim_max_does_not_freeze_broker => |d| memory::broker_freeze(d, Lie::ClaimMax, false),
    item07_claim_random_does_not_freeze_broker => |d| memory::broker_freeze(d, Lie::ClaimRandom, false),
    item07_next_pos_behind_does_not_freeze_broker => |d| memory::broker_freeze(d, Lie::NextPosBehind, false),
    item07_next_pos_beyond_does_not_freeze_broker => |d| memory::broker_freeze(d, Lie::NextPosBeyond, false),
    item07_garbage_commit_words_do_not_freeze_broker => |d| memory::broker_freeze(d, Lie::GarbageCommit, false),
    item07_random_header_and_data_do_not_freeze_broker => |d| memory::broker_freeze(d, Lie::AllRandom, false),
    item08_claim_max_does_not_spin_reader => |d| memory::reader_spin(d, Lie::ClaimMax, false),
    item08_claim_random_does_not_spin_reader => |d| memory::reader_spin(d, Lie::ClaimRandom, false),
    item08_next_pos_beyond_does_not_spin_reader => |d| memory::reader_spin(d, Lie::NextPosBeyond, false),
    item08_garbage_commit_words_do_not_spin_reader => |d| memory::reader_spin(d, Lie::GarbageCommit, false),
    item08_random_header_and_data_do_not_spin_reader => |d| memory::reader_spin(d, Lie::AllRandom, false),
    item07_lossy_claim_max_does_not_freeze_broker => |d| memory::broker_freeze(d, Lie::ClaimMax, true),
    item07_lossy_random_header_and_data_do_not_freeze_broker => |d| memory::broker_freeze(d, Lie::AllRandom, true),
    item08_lossy_claim_max_does_not_spin_reader => |d| memory::reader_spin(d, Lie::ClaimMax, true),
    item08_lossy_claim_random_does_not_spin_reader => |d| memory::reader_spin(d, Lie::ClaimRandom, true),
    item08_lossy_garbage_commit_words_do_not_spin_reader => |d| memory::reader_spin(d, Lie::GarbageCommit, true),
    item09_hostile_publishers_do_not_get_honest_subscribers_evicted => memory::honest_not_evicted,
    item10_cursor_behind_window_does_not_block_publisher => |d| memory::publisher_not_blocked(d, Cursor::Behind),
    item10_cursor_ahead_does_not_block_publisher => |d| memory::publisher_not_blocked(d, Cursor::Ahead),
    item10_cursor_misaligned_does_not_block_publisher => |d| memory::publisher_not_blocked(d, Cursor::Misaligned),
    item10_cursor_mid_record_does_not_block_publisher => |d| memory::publisher_not_blocked(d, Cursor::MidRecord),
    item10_cursor_oscillating_does_not_block_publisher => |d| memory::publisher_not_blocked(d, Cursor::Oscillating),
    item10_cursor_oscillating_fast_does_not_block_publisher => |d| memory::publisher_not_blocked(d, Cursor::OscillatingFast),
    item12_topic_names_239_to_255_bytes_work => limits::long_topic_names,
);
