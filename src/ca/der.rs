//! The few DER encodings Lanyard writes and reads by hand (the roles extension).

/// Appends a DER length.
pub(crate) fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Appends a DER TLV.
pub(crate) fn push_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    push_len(out, value.len());
    out.extend_from_slice(value);
}

/// Reads one DER TLV with the given tag; returns (value, rest). Strict: definite, minimal lengths.
pub(crate) fn read_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n || rest[0] == 0 {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | b as usize;
        }
        if len < 0x80 {
            return None;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_round_trip() {
        let value = vec![7u8; 300];
        let mut out = Vec::new();
        push_tlv(&mut out, 0x04, &value);
        assert_eq!(&out[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (v, rest) = read_tlv(&out, 0x04).unwrap();
        assert_eq!(v, &value[..]);
        assert!(rest.is_empty());
    }

    #[test]
    fn rejects_truncated_and_non_minimal() {
        assert!(read_tlv(&[0x30, 0x05, 1, 2], 0x30).is_none());
        assert!(read_tlv(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5], 0x30).is_none());
        assert!(read_tlv(&[0x31, 0x00], 0x30).is_none());
    }
}
