//! Interrupts a verb handles itself. By default SIGINT, SIGTERM and SIGHUP end paude-launch at
//! once (see `main.rs`); while a [`Guard`] lives, the first one is handed to the verb instead:
//! it sees it at its next step ([`check`]), undoes what it was making and then ends. A second
//! signal ends the process as usual.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static GUARDS: AtomicUsize = AtomicUsize::new(0);
static FIRED: AtomicBool = AtomicBool::new(false);

/// While alive, the first interrupt goes to [`check`] instead of ending the process.
#[must_use = "the guard protects only while it lives"]
pub struct Guard(());

/// Hands interrupts to the current verb until the guard drops.
pub fn guard() -> Guard {
    GUARDS.fetch_add(1, Ordering::SeqCst);
    Guard(())
}

impl Drop for Guard {
    fn drop(&mut self) {
        GUARDS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a verb handles the next interrupt itself.
pub fn guarded() -> bool {
    GUARDS.load(Ordering::SeqCst) > 0
}

/// Delivers an interrupt to the guarded verb.
pub fn fire() {
    FIRED.store(true, Ordering::SeqCst);
}

/// Whether an interrupt was delivered.
pub fn was_fired() -> bool {
    FIRED.load(Ordering::SeqCst)
}

/// An error once an interrupt was delivered: a guarded verb calls it between its steps.
pub fn check() -> anyhow::Result<()> {
    if was_fired() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
