//! Platform fakes and load scenarios.
