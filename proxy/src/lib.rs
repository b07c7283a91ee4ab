//! paude-proxy: a filtering egress proxy.
