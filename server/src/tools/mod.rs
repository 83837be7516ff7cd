//! Commands that do not serve, each on its own over the library's API:
//! `keybroker dev` ([`dev`]), the offline `migrate` ([`offline`]),
//! `backup` / `restore` ([`backup`]) and the `rewrap` pass ([`rewrap`]).

pub mod backup;
pub mod dev;
pub mod offline;
pub mod rewrap;
