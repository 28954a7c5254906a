//! The media threads: a small fixed pool (one per core by default,
//! `[profile.media] threads`), each running a single-threaded tokio runtime
//! that owns the calls placed on it — their RTP/RTCP sockets, timers, agent
//! connections — from the first packet to the last.
//!
//! Why not the daemon's multi-threaded runtime: at 50 packets per second per
//! call, a call's task wakes several times per 20 ms (packet arrival, the
//! jitter buffer's slot, the send tick), and on a work-stealing runtime each
//! wake-up may hand the task to another parked worker, a futex wake and a
//! context switch per packet. Profiles of the daemon at 50 echo calls showed
//! half the CPU in the kernel and a quarter in `finish_task_switch` alone.
//! On a thread of its own, a runtime takes every ready socket from one
//! `epoll_wait`, fires every due timer from one wheel, and runs the calls'
//! tasks one after the other on a warm cache, without waking anyone.
//!
//! Calls are placed on the thread with the fewest live tasks; a call never
//! moves. SIP, the admin API, the store and the listeners stay on the main
//! runtime; a call reaches them through channels and shared sockets, which
//! work across runtimes.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a stopping media thread waits for blocking work its tasks
/// started.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// One media thread: its runtime's handle and how many tasks it runs.
struct Worker {
    handle: Handle,
    tasks: Arc<AtomicUsize>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The media threads.
pub(crate) struct MediaPool {
    workers: Vec<Worker>,
}

/// Counts a task out of its worker when it ends (also when cancelled).
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MediaPool {
    /// Starts `threads` media threads (0: one per core the process may use).
    pub(crate) fn start(threads: usize) -> std::io::Result<MediaPool> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        };
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("sb-media-{i}-blk"))
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("sb-media-{i}"))
                .spawn(move || {
                    // Runs the calls' tasks until the pool stops; then what
                    // is left is cancelled, and blocking work it started
                    // (a name lookup) is given a moment, not waited for.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    runtime.shutdown_timeout(SHUTDOWN_GRACE);
                })?;
            workers.push(Worker {
                handle,
                tasks: Arc::new(AtomicUsize::new(0)),
                stop: Mutex::new(Some(stop)),
                thread: Mutex::new(Some(thread)),
            });
        }
        Ok(MediaPool { workers })
    }

    /// How many media threads run.
    pub(crate) fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Runs a call's task on the media thread with the fewest tasks; the
    /// task stays there until it ends.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.tasks.load(Ordering::Relaxed))
        else {
            // `start` makes at least one thread; this is not reached.
            return tokio::spawn(task);
        };
        worker.tasks.fetch_add(1, Ordering::Relaxed);
        let live = Live(Arc::clone(&worker.tasks));
        // Boxed once here: awaited inline, the task would take twice its
        // size in this wrapper (its captured and its running state).
        let task = Box::pin(task);
        worker.handle.spawn(async move {
            let _live = live;
            task.await;
        })
    }

    /// Stops the threads: tasks still running are dropped (their sockets
    /// closed). Waits for the threads to end.
    /// Not from a media thread (it would wait for itself).
    pub(crate) fn stop(&self) {
        self.signal_stop();
        for w in &self.workers {
            if let Some(t) = super::lock(&w.thread).take() {
                let _ = t.join();
            }
        }
    }

    fn signal_stop(&self) {
        for w in &self.workers {
            if let Some(s) = super::lock(&w.stop).take() {
                let _ = s.send(());
            }
        }
    }
}

impl Drop for MediaPool {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_go_to_the_least_busy_thread_and_are_counted_out() {
        let pool = MediaPool::start(2).unwrap();
        assert_eq!(pool.threads(), 2);
        let (release, released) = tokio::sync::watch::channel(false);
        let (names_tx, names_rx) = std::sync::mpsc::channel();
        let mut joins = Vec::new();
        for _ in 0..4 {
            let mut released = released.clone();
            let names_tx = names_tx.clone();
            joins.push(pool.spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                names_tx.send(name).unwrap();
                let _ = released.wait_for(|r| *r).await;
            }));
        }
        let mut names: Vec<_> = (0..4)
            .map(|_| names_rx.recv().unwrap().unwrap_or_default())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["sb-media-0", "sb-media-0", "sb-media-1", "sb-media-1"]
        );
        let counts: Vec<_> = pool
            .workers
            .iter()
            .map(|w| w.tasks.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, [2, 2]);
        release.send(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for j in joins {
                j.await.unwrap();
            }
        });
        assert!(
            pool.workers
                .iter()
                .all(|w| w.tasks.load(Ordering::Relaxed) == 0)
        );
        pool.stop();
    }
}
