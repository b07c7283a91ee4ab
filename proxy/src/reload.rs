//! Reloading: SIGHUP and the content watcher both call [`Reloader::reload`], which re-reads
//! the config file and the policy files and swaps the compiled policy for new connections. A
//! file that fails to load leaves the policy in force untouched and logs why (never fails
//! open). Settings that need a new socket or runtime (listen address, limits) are reported
//! but only take effect on restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{self, Cli, Settings};
use crate::server::Core;

/// Reloads the policy from the same flags the proxy started with.
pub struct Reloader {
    cli: Cli,
    core: Arc<Core>,
    /// The settings of the last successful load, to compare and to find the files to watch.
    last: Mutex<Settings>,
    /// The content fingerprint of the watched files when the reloader was made, before the
    /// proxy reports that it listens: a change made after that report is always noticed.
    baseline: u64,
}

impl Reloader {
    pub fn new(cli: Cli, core: Arc<Core>, settings: Settings) -> Reloader {
        let baseline = config::fingerprint(cli.config.as_deref(), settings.policies.as_deref());
        Reloader {
            cli,
            core,
            last: Mutex::new(settings),
            baseline,
        }
    }

    /// Loads everything again; swaps the policy on success, keeps the old one on error.
    pub fn reload(&self, why: &str) -> bool {
        match config::load(&self.cli) {
            Ok(loaded) => {
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                let restart_needed = loaded.settings.listen != last.listen
                    || loaded.settings.limits != last.limits
                    || loaded.settings.admin_listen != last.admin_listen
                    || loaded.settings.audit_log != last.audit_log
                    || loaded.settings.dns_servers != last.dns_servers
                    || loaded.settings.worker_threads != last.worker_threads;
                if restart_needed {
                    tracing::warn!("the listen address, limits, admin, audit, DNS or worker settings changed; restart paude-proxy to apply them");
                }
                self.core.policy.store(Arc::new(loaded.policy));
                *last = loaded.settings;
                self.core.metrics.reload(true);
                tracing::info!("policy reloaded ({why})");
                true
            }
            Err(e) => {
                self.core.metrics.reload(false);
                tracing::error!("reload failed ({why}), keeping the policy in force: {e:#}");
                false
            }
        }
    }

    fn fingerprint(&self) -> u64 {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        config::fingerprint(self.cli.config.as_deref(), last.policies.as_deref())
    }

    /// Polls the content of the config file and policy directory every `interval` and
    /// reloads when it changes. Returns at once for a zero interval.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if interval.is_zero()
            || (self.cli.config.is_none() && self.last.lock().is_ok_and(|l| l.policies.is_none()))
        {
            return;
        }
        let mut seen = self.baseline;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let me = self.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || me.fingerprint()).await else {
                continue;
            };
            if now != seen {
                seen = now;
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.reload("files changed")).await;
            }
        }
    }
}
