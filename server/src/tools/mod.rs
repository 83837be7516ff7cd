//! Commands that do not serve, each on its own over the library's API:
//! `keybroker dev` ([`dev`]), the offline `migrate` ([`offline`]),
//! `backup` / `restore` ([`backup`]), the `rewrap` pass ([`rewrap`]), the
//! configuration reference ([`config_reference`]) and `audit verify`
//! ([`audit`]).

pub mod audit;
pub mod backup;
pub mod config_reference;
pub mod dev;
pub mod offline;
pub mod rewrap;
