//! The web console: pages for people, served by the same binary as the API.
//!
//! It owns what is the console's own: the pages (minijinja templates rendered on the
//! server, `templates/`), their assets (one stylesheet and one small script of our own,
//! `assets/`, embedded in the binary), and the crypto of sign-in sessions and CSRF
//! tokens (`session`). It knows minijinja but not axum: `http/console/` routes requests
//! to it, reads the store and the runner through the same code as the API, and hands
//! plain data to `Views::render`. No rule of the domain lives here.
//!
//! Why server-rendered HTML and no bundle: every page is a view of data the server
//! already has, so rendering it there needs no second implementation of any rule, no
//! Node at build time, and works without script; the script only adds what a page
//! cannot do alone (the live preview, live job counts, upload progress, local times).

pub mod assets;
pub mod session;
mod views;

pub use views::Views;

/// Why a page could not be rendered (a template bug: logged, and the visitor gets a
/// plain error page).
#[derive(Debug, thiserror::Error)]
#[error("rendering {template}: {message}")]
pub struct RenderError {
    pub template: String,
    pub message: String,
}
