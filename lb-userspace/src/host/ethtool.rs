//! GRO through the ethtool generic netlink family (Linux 5.6), as
//! `ethtool -k DEV` and `ethtool -K DEV gro on` do it.
//!
//! The ethtool crate (0.2) reads features; it cannot write them, so the one
//! write the daemon makes, ETHTOOL_MSG_FEATURES_SET, is built here and sent
//! over the crate's generic netlink connection.

use std::{io, path::Path, pin::pin};

use ethtool::{EthtoolAttr, EthtoolError, EthtoolFeatureAttr, EthtoolHandle, EthtoolHeader};
use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkMessage, NetlinkPayload, Nla, ParseableParametrized,
    NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use super::{netlink_error, netns, HostError};

/// The kernel's name for the GRO feature bit (`ethtool -k` shows it as
/// `generic-receive-offload`).
const GRO: &str = "rx-gro";

// From linux/ethtool_netlink.h.
const ETHTOOL_GENL_VERSION: u8 = 1;
const ETHTOOL_MSG_FEATURES_SET: u8 = 12;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_WANTED: u16 = 3;
const ETHTOOL_FLAG_OMIT_REPLY: u32 = 1 << 1;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BIT_VALUE: u16 = 3;

/// Turns GRO on for `ifname` in `netns` unless it already is; whether it
/// changed anything.
pub(super) async fn ensure_gro(netns: &Path, ifname: &str) -> Result<bool, HostError> {
    let mut handle = netns::in_netns(netns, || {
        let (conn, handle, _) = ethtool::new_connection().map_err(|source| HostError::Socket {
            family: "ethtool",
            source,
        })?;
        tokio::spawn(conn);
        Ok(handle)
    })
    .await?;
    if gro_on(&mut handle, ifname).await? {
        return Ok(false);
    }
    set_gro_on(&mut handle, ifname)
        .await
        .map_err(|e| netlink_error(format!("ETHTOOL_MSG_FEATURES_SET {ifname} {GRO} on"), e))?;
    // The kernel accepts a wish it cannot grant (a fixed feature): check.
    if !gro_on(&mut handle, ifname).await? {
        return Err(HostError::GroFixed(ifname.to_owned()));
    }
    Ok(true)
}

/// Whether GRO is active on `ifname`.
async fn gro_on(handle: &mut EthtoolHandle, ifname: &str) -> Result<bool, HostError> {
    let err = |e| netlink_error(format!("ETHTOOL_MSG_FEATURES_GET {ifname}"), e);
    let mut replies = pin!(handle.feature().get(Some(ifname)).execute().await);
    while let Some(reply) = replies.try_next().await.map_err(|e| err(ethtool_io(e)))? {
        for attr in reply.payload.nlas {
            if let EthtoolAttr::Feature(EthtoolFeatureAttr::Active(bits)) = attr {
                return Ok(bits.iter().any(|b| b.name == GRO && b.value));
            }
        }
    }
    Err(err(io::Error::other("the answer lists no active features")))
}

fn ethtool_io(e: EthtoolError) -> io::Error {
    match e {
        EthtoolError::NetlinkError(m) => m.to_io(),
        e => io::Error::other(e.to_string()),
    }
}

async fn set_gro_on(handle: &mut EthtoolHandle, ifname: &str) -> io::Result<()> {
    let mut req = NetlinkMessage::from(GenlMessage::from_payload(FeaturesSet::gro_on(ifname)));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let answers = handle
        .handle
        .request(req)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut answers = pin!(answers);
    while let Some(answer) = answers.next().await {
        let answer = answer.map_err(|e| io::Error::other(e.to_string()))?;
        if let NetlinkPayload::Error(e) = answer.payload {
            if e.code.is_some() {
                return Err(e.to_io());
            }
        }
    }
    Ok(())
}

/// An ETHTOOL_MSG_FEATURES_SET request: its attributes, already nested.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FeaturesSet(Vec<DefaultNla>);

impl FeaturesSet {
    /// Wants GRO on for `ifname` and leaves every other feature alone (a
    /// bitset with a mask: only the bits listed change), asking for no
    /// reply but the ack.
    fn gro_on(ifname: &str) -> Self {
        let header = nest(
            ETHTOOL_A_FEATURES_HEADER,
            &[
                EthtoolHeader::DevName(ifname.to_owned()),
                EthtoolHeader::Flags(ETHTOOL_FLAG_OMIT_REPLY),
            ],
        );
        let mut name = GRO.as_bytes().to_vec();
        name.push(0);
        let bit = nest(
            ETHTOOL_A_BITSET_BITS_BIT,
            &[
                DefaultNla::new(ETHTOOL_A_BITSET_BIT_NAME, name),
                // A flag: present means on.
                DefaultNla::new(ETHTOOL_A_BITSET_BIT_VALUE, Vec::new()),
            ],
        );
        let bits = nest(ETHTOOL_A_BITSET_BITS, &[bit]);
        Self(vec![header, nest(ETHTOOL_A_FEATURES_WANTED, &[bits])])
    }
}

/// A nested attribute holding `inner`.
fn nest<T: Nla>(kind: u16, inner: &[T]) -> DefaultNla {
    let mut value = vec![0; inner.buffer_len()];
    inner.emit(&mut value);
    DefaultNla::new(kind | NLA_F_NESTED, value)
}

impl GenlFamily for FeaturesSet {
    fn family_name() -> &'static str {
        "ethtool"
    }

    fn command(&self) -> u8 {
        ETHTOOL_MSG_FEATURES_SET
    }

    fn version(&self) -> u8 {
        ETHTOOL_GENL_VERSION
    }
}

impl Emitable for FeaturesSet {
    fn buffer_len(&self) -> usize {
        self.0.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.0.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for FeaturesSet {
    /// The request asks for no reply (only the ack, which is not parsed
    /// through here), so there is nothing to read back.
    fn parse_with_param(_buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request `ethtool -K veth0 gro on` amounts to, byte for byte
    /// (native byte order, 4-byte aligned attributes).
    #[test]
    fn gro_on_request_bytes() {
        let req = FeaturesSet::gro_on("veth0");
        let mut buf = vec![0; req.buffer_len()];
        req.emit(&mut buf);
        let nla = |kind: u16, value: &[u8]| {
            let mut out = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
            out.extend(kind.to_ne_bytes());
            out.extend(value);
            out.resize(out.len().next_multiple_of(4), 0);
            out
        };
        let header = [
            nla(2, b"veth0\0"),
            nla(3, &ETHTOOL_FLAG_OMIT_REPLY.to_ne_bytes()),
        ]
        .concat();
        let bit = [nla(2, b"rx-gro\0"), nla(3, &[])].concat();
        let wanted = nla(3 | NLA_F_NESTED, &nla(1 | NLA_F_NESTED, &bit));
        let expected = [
            nla(1 | NLA_F_NESTED, &header),
            nla(3 | NLA_F_NESTED, &wanted),
        ]
        .concat();
        assert_eq!(buf, expected);
        assert_eq!(req.command(), 12);
        assert_eq!(FeaturesSet::family_name(), "ethtool");
    }
}
