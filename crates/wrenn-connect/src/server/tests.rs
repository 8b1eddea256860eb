//! Tests of the router against real prost/pbjson messages.

use super::*;
