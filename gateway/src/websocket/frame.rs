//! RFC 6455 frames, as plain functions over bytes: a client's frame out of what was read, the
//! frames of one message put together, and a server's frame into what will be written. The
//! header codec is tungstenite's; what is decided here is what a server accepts.

use std::io::Cursor;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// The largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why a client's bytes are not a WebSocket conversation this server goes on with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A frame, or a message of several frames, larger than the socket's limit.
    #[error("a frame or message over {limit} bytes")]
    TooBig { limit: usize },
    #[error("WebSocket protocol violation: {0}")]
    Protocol(&'static str),
}

/// One frame as received, its payload unmasked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) fin: bool,
    pub(crate) opcode: OpCode,
    pub(crate) payload: Vec<u8>,
}

/// The first frame in `bytes` and how many bytes it took, or None until all of it is there.
/// A client's frame must be masked (§5.1), use no extension bits, and name a known opcode; a
/// control frame must be whole and short (§5.5). A payload over `max_frame` is refused as soon
/// as its header says so, before it arrives.
pub(crate) fn decode(bytes: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let mut cursor = Cursor::new(bytes);
    let (header, length) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(FrameError::Protocol("reserved opcode")),
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(FrameError::Protocol("reserved bits set, and no extension was agreed"));
    }
    let Some(mask) = header.mask else { return Err(FrameError::Protocol("a client's frame must be masked")) };
    if matches!(header.opcode, OpCode::Control(_)) {
        if !header.is_final {
            return Err(FrameError::Protocol("a fragmented control frame"));
        }
        if length > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::Protocol("a control frame over 125 bytes"));
        }
    }
    let length = usize::try_from(length).ok().filter(|&l| l <= max_frame);
    let Some(length) = length else { return Err(FrameError::TooBig { limit: max_frame }) };
    // The header is at most 14 bytes: the cursor's position fits.
    let start = cursor.position() as usize;
    let Some(payload) = bytes.get(start..start + length) else { return Ok(None) };
    let mut payload = payload.to_vec();
    unmask(&mut payload, mask);
    Ok(Some((Frame { fin: header.is_final, opcode: header.opcode, payload }, start + length)))
}

/// XORs the payload with its 4-byte key (§5.3); tungstenite keeps its own version private.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// The frames of a data message received so far, while it arrives in several.
#[derive(Debug)]
pub(crate) struct Fragments {
    text: bool,
    data: Vec<u8>,
}

/// What a frame means: a whole message, or None while a fragmented one goes on (kept in
/// `fragments`, at most `max_message` bytes). Text must be UTF-8 once whole, and a close frame's
/// code one an endpoint may send.
pub(crate) fn message(
    frame: Frame,
    fragments: &mut Option<Box<Fragments>>,
    max_message: usize,
) -> Result<Option<Message>, FrameError> {
    let Frame { fin, opcode, payload } = frame;
    let data = match opcode {
        OpCode::Control(control) => return control_message(control, payload).map(Some),
        OpCode::Data(Data::Continue) => {
            let Some(partial) = fragments.as_mut() else {
                return Err(FrameError::Protocol("a continuation frame outside a message"));
            };
            if partial.data.len() + payload.len() > max_message {
                return Err(FrameError::TooBig { limit: max_message });
            }
            partial.data.extend_from_slice(&payload);
            if !fin {
                return Ok(None);
            }
            fragments.take().map(|partial| *partial)
        }
        OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
            if fragments.is_some() {
                return Err(FrameError::Protocol("a new message before the last one ended"));
            }
            let partial = Fragments { text: kind == Data::Text, data: payload };
            if !fin {
                *fragments = Some(Box::new(partial));
                return Ok(None);
            }
            Some(partial)
        }
        // Refused by the header's parser already.
        OpCode::Data(Data::Reserved(_)) => return Err(FrameError::Protocol("reserved opcode")),
    };
    let Some(Fragments { text, data }) = data else { return Ok(None) };
    if !text {
        return Ok(Some(Message::Binary(Bytes::from(data))));
    }
    let text = String::from_utf8(data).map_err(|_| FrameError::Protocol("a text message that is not UTF-8"))?;
    Ok(Some(Message::Text(text.into())))
}

fn control_message(control: Control, payload: Vec<u8>) -> Result<Message, FrameError> {
    match control {
        Control::Ping => Ok(Message::Ping(payload.into())),
        Control::Pong => Ok(Message::Pong(payload.into())),
        Control::Close => close_frame(&payload).map(Message::Close),
        Control::Reserved(_) => Err(FrameError::Protocol("reserved opcode")),
    }
}

/// A close frame's payload: nothing, or a code and a UTF-8 reason (§5.5.1, §7.4).
fn close_frame(payload: &[u8]) -> Result<Option<CloseFrame>, FrameError> {
    let (code, reason) = match payload {
        [] => return Ok(None),
        [high, low, reason @ ..] => (u16::from_be_bytes([*high, *low]), reason),
        [_] => return Err(FrameError::Protocol("a close frame with half a code")),
    };
    if !CloseCode::from(code).is_allowed() {
        return Err(FrameError::Protocol("a close code no endpoint may send"));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| FrameError::Protocol("a close reason that is not UTF-8"))?;
    Ok(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) }))
}

/// Appends `message` to `out` as one unmasked frame, as a server sends it.
pub(crate) fn encode(message: &Message, out: &mut Vec<u8>) {
    let close_payload;
    let (opcode, payload): (OpCode, &[u8]) = match message {
        Message::Text(text) => (OpCode::Data(Data::Text), text.as_str().as_bytes()),
        Message::Binary(data) => (OpCode::Data(Data::Binary), data),
        Message::Ping(data) => (OpCode::Control(Control::Ping), data),
        Message::Pong(data) => (OpCode::Control(Control::Pong), data),
        Message::Close(frame) => {
            close_payload = frame
                .as_ref()
                .map(|f| [&f.code.to_be_bytes()[..], f.reason.as_str().as_bytes()].concat())
                .unwrap_or_default();
            (OpCode::Control(Control::Close), &close_payload)
        }
    };
    let header = FrameHeader { is_final: true, rsv1: false, rsv2: false, rsv3: false, opcode, mask: None };
    out.reserve(header.len(payload.len() as u64) + payload.len());
    // Writing to a Vec cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's frame: masked, as RFC 6455 requires of clients.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    const TEXT: u8 = 0x81;
    const TEXT_PART: u8 = 0x01;
    const CONTINUE_END: u8 = 0x80;
    const CLOSE: u8 = 0x88;
    const PING: u8 = 0x89;

    fn whole(bytes: &[u8]) -> Message {
        let (frame, used) = decode(bytes, 1 << 20).unwrap().expect("a whole frame");
        assert_eq!(used, bytes.len());
        message(frame, &mut None, 1 << 20).unwrap().expect("a whole message")
    }

    #[test]
    fn a_masked_text_frame_is_its_text_and_its_length() {
        let mut bytes = client_frame(TEXT, br#"{"type":"ack","ids":["m1"]}"#);
        let trailing = client_frame(PING, b"p");
        bytes.extend_from_slice(&trailing);
        let (frame, used) = decode(&bytes, 1024).unwrap().unwrap();
        assert_eq!(used, bytes.len() - trailing.len(), "the next frame is left where it is");
        assert_eq!(frame.payload, br#"{"type":"ack","ids":["m1"]}"#);
        for long in [200, 70_000] {
            let text = "x".repeat(long);
            assert_eq!(whole(&client_frame(TEXT, text.as_bytes())), Message::Text(text.into()));
        }
    }

    #[test]
    fn a_frame_in_parts_waits_for_the_rest() {
        let bytes = client_frame(TEXT, &[b'a'; 300]);
        for cut in [0, 1, 2, 3, 5, 8, 100, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut], 1024), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn what_a_server_must_refuse_is_refused() {
        let protocol = |bytes: &[u8]| matches!(decode(bytes, 1024), Err(FrameError::Protocol(_)));
        assert!(protocol(&[0x81, 0x02, b'h', b'i']), "unmasked");
        assert!(protocol(&client_frame(0xC1, b"hi")), "rsv1 without an extension");
        assert!(protocol(&client_frame(0x83, b"hi")), "reserved data opcode");
        assert!(protocol(&client_frame(0x8B, b"")), "reserved control opcode");
        assert!(protocol(&client_frame(0x09, b"")), "a fragmented ping");
        assert!(protocol(&client_frame(PING, &[0; 126])), "a long ping");
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_alone() {
        let bytes = client_frame(TEXT, &[b'a'; 5000]);
        assert_eq!(decode(&bytes[..8], 4096), Err(FrameError::TooBig { limit: 4096 }));
        let huge = [0x81, 0x80 | 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4];
        assert_eq!(decode(&huge, 4096), Err(FrameError::TooBig { limit: 4096 }));
    }

    #[test]
    fn fragments_make_one_message_within_the_limit() {
        let mut fragments = None;
        let frame = |bytes: Vec<u8>| decode(&bytes, 1024).unwrap().unwrap().0;
        assert_eq!(message(frame(client_frame(TEXT_PART, b"he")), &mut fragments, 10), Ok(None));
        // A control frame may come between a message's fragments.
        assert_eq!(message(frame(client_frame(PING, b"")), &mut fragments, 10), Ok(Some(Message::Ping(Bytes::new()))));
        assert_eq!(message(frame(client_frame(0x00, b"ll")), &mut fragments, 10), Ok(None));
        let end = message(frame(client_frame(CONTINUE_END, b"o")), &mut fragments, 10);
        assert_eq!(end, Ok(Some(Message::Text("hello".into()))));
        assert!(fragments.is_none());

        assert_eq!(message(frame(client_frame(TEXT_PART, b"12345678")), &mut fragments, 10), Ok(None));
        let over = message(frame(client_frame(CONTINUE_END, b"9ab")), &mut fragments, 10);
        assert_eq!(over, Err(FrameError::TooBig { limit: 10 }));
    }

    #[test]
    fn fragments_out_of_order_or_text_not_utf8_are_refused() {
        let frame = |bytes: Vec<u8>| decode(&bytes, 1024).unwrap().unwrap().0;
        let refused = |r: Result<Option<Message>, FrameError>| matches!(r, Err(FrameError::Protocol(_)));
        assert!(refused(message(frame(client_frame(CONTINUE_END, b"x")), &mut None, 10)), "no message to continue");
        let mut fragments = None;
        message(frame(client_frame(TEXT_PART, b"a")), &mut fragments, 10).unwrap();
        assert!(refused(message(frame(client_frame(TEXT, b"b")), &mut fragments, 10)), "a message inside a message");
        assert!(refused(message(frame(client_frame(TEXT, &[0xff, 0xfe])), &mut None, 10)), "not UTF-8");
        // UTF-8 split across fragments is whole in the end.
        let mut fragments = None;
        message(frame(client_frame(TEXT_PART, &[0xc3])), &mut fragments, 10).unwrap();
        let end = message(frame(client_frame(CONTINUE_END, &[0xa9])), &mut fragments, 10);
        assert_eq!(end, Ok(Some(Message::Text("é".into()))));
    }

    #[test]
    fn a_close_frame_says_its_code_and_reason_or_nothing() {
        assert_eq!(whole(&client_frame(CLOSE, b"")), Message::Close(None));
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let expected = Message::Close(Some(CloseFrame { code: 1000, reason: "bye".into() }));
        assert_eq!(whole(&client_frame(CLOSE, &payload)), expected);
        let refused = |payload: &[u8]| {
            let (frame, _) = decode(&client_frame(CLOSE, payload), 1024).unwrap().unwrap();
            matches!(message(frame, &mut None, 1024), Err(FrameError::Protocol(_)))
        };
        assert!(refused(&[0x03]), "half a code");
        assert!(refused(&1005u16.to_be_bytes()), "1005 is never sent");
        assert!(refused(&999u16.to_be_bytes()));
        assert!(refused(&[0x03, 0xe8, 0xff]), "a reason not UTF-8");
    }

    #[test]
    fn a_server_frame_is_unmasked_and_as_long_as_it_says() {
        let mut out = Vec::new();
        encode(&Message::Text("hi".into()), &mut out);
        assert_eq!(out, [0x81, 0x02, b'h', b'i']);
        out.clear();
        encode(&Message::Text("x".repeat(300).into()), &mut out);
        assert_eq!(&out[..4], [0x81, 126, 0x01, 0x2c]);
        assert_eq!(out.len(), 4 + 300);
        out.clear();
        encode(&Message::Close(Some(CloseFrame { code: 4001, reason: "slow".into() })), &mut out);
        assert_eq!(out, [0x88, 0x06, 0x0f, 0xa1, b's', b'l', b'o', b'w']);
        out.clear();
        encode(&Message::Ping(Bytes::new()), &mut out);
        assert_eq!(out, [0x89, 0x00]);
    }
}
