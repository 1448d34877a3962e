//! CPU reference backend (work in progress: implemented under issue 3).
