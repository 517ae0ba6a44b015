//! Wake drivers (being written).
