//! dfdx models, datasets, trainer and experiments for Budgeted Broadcast, and the command-line
//! front ends of the `bb` program. This is the only crate of the workspace that knows dfdx.

pub mod changedet;
pub mod checkpoint;
pub mod cli_bench;
pub mod cli_conv;
pub mod cli_export;
pub mod cli_mask;
pub mod cli_run;
pub mod cli_sweep;
pub mod cli_theory;
pub mod config;
pub mod convkit;
pub mod convrun;
pub mod data;
pub mod em;
pub mod export;
pub mod faceid;
pub mod fpenv;
pub mod io;
pub mod measure;
pub mod model;
pub mod npy;
pub mod optim;
pub mod realdata;
pub mod report;
pub mod resnet;
pub mod speech;
pub mod stats;
pub mod sweep;
pub mod threads;
pub mod trainer;
