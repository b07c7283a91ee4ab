//! The TLS 1.3 ClientHello that opens every benchmark tunnel.
//!
//! paude-proxy checks that a tunnel's first bytes are a ClientHello whose SNI equals the CONNECT
//! host, so the load generator sends a well-formed one (RFC 8446, section 4.1.2) and the sink
//! echoes it back. The bytes are built once per host and reused for every tunnel.

/// Encodes a complete TLS record holding a ClientHello for `sni`.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(512);
    body.extend_from_slice(&[0x03, 0x03]); // legacy_version: TLS 1.2
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11))); // random
    body.push(32); // legacy_session_id
    body.extend((0..32u8).map(|i| i.wrapping_mul(13).wrapping_add(5)));
    put_u16_list(&mut body, &[0x1301, 0x1302, 0x1303]); // cipher suites
    body.extend_from_slice(&[1, 0]); // legacy_compression_methods: null only

    let mut extensions = Vec::new();
    let name = sni.as_bytes();
    let mut server_name = Vec::new();
    put_u16(&mut server_name, (name.len() + 3) as u16); // server_name_list length
    server_name.push(0); // name_type: host_name
    put_u16(&mut server_name, name.len() as u16);
    server_name.extend_from_slice(name);
    put_extension(&mut extensions, 0x0000, &server_name);

    let mut groups = Vec::new();
    put_u16_list(&mut groups, &[0x001d, 0x0017]); // x25519, secp256r1
    put_extension(&mut extensions, 0x000a, &groups);

    let mut signatures = Vec::new();
    put_u16_list(&mut signatures, &[0x0403, 0x0804, 0x0401]);
    put_extension(&mut extensions, 0x000d, &signatures);

    put_extension(&mut extensions, 0x002b, &[2, 0x03, 0x04]); // supported_versions: TLS 1.3
    put_extension(&mut extensions, 0x002d, &[1, 1]); // psk_key_exchange_modes: psk_dhe_ke

    let mut key_share = Vec::new();
    put_u16(&mut key_share, 36); // client_shares length
    put_u16(&mut key_share, 0x001d);
    put_u16(&mut key_share, 32);
    key_share.extend((0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(1)));
    put_extension(&mut extensions, 0x0033, &key_share);

    put_u16(&mut body, extensions.len() as u16);
    body.extend_from_slice(&extensions);

    let mut record = Vec::with_capacity(body.len() + 9);
    record.extend_from_slice(&[0x16, 0x03, 0x01]); // handshake record, legacy version TLS 1.0
    put_u16(&mut record, (body.len() + 4) as u16);
    record.push(1); // handshake type: client_hello
    record.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&body);
    record
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_u16_list(out: &mut Vec<u8>, values: &[u16]) {
    put_u16(out, (values.len() * 2) as u16);
    for value in values {
        put_u16(out, *value);
    }
}

fn put_extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    put_u16(out, kind);
    put_u16(out, data.len() as u16);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::client_hello;

    #[test]
    fn record_and_handshake_lengths_cover_the_whole_message() {
        let record = client_hello("bench.test");
        assert_eq!(record[0], 0x16);
        let record_len = u16::from_be_bytes([record[3], record[4]]) as usize;
        assert_eq!(record_len + 5, record.len());
        assert_eq!(record[5], 1);
        let handshake_len = u32::from_be_bytes([0, record[6], record[7], record[8]]) as usize;
        assert_eq!(handshake_len + 9, record.len());
    }

    #[test]
    fn server_name_extension_carries_the_host() {
        let record = client_hello("a.bench.test");
        let needle = b"\x00\x00\x0c\x61.bench.test";
        assert!(record.windows(needle.len()).any(|w| w == needle));
    }
}
