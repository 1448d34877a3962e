//! Shared helpers of the integration tests: a seeded random generator and an independent float64 reference.
