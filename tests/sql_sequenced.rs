#![cfg(any(feature = "postgres", feature = "sqlite"))]
