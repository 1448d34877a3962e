//! Hopper (sm_90a) backend (work in progress: implemented under issue 5).
