//! Reading a JSONL batch one line at a time, with a cap on line length, so that neither a huge
//! batch nor one huge line has to sit in memory.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Longest batch line accepted by default, in bytes (newline excluded).
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// One non-blank line of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLine {
    /// 1-based line number, blank lines included in the count.
    pub number: u64,
    /// What the line holds.
    pub text: LineText,
}

/// The content of a batch line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineText {
    /// The line, without its line ending.
    Text(String),
    /// The line is not valid UTF-8.
    NotUtf8,
    /// The line is longer than the cap; its content was skipped.
    TooLong {
        /// Its length in bytes.
        bytes: u64,
    },
}

/// Reads the lines of a batch, skipping blank ones.
#[derive(Debug)]
pub struct BatchReader<R> {
    reader: R,
    number: u64,
    max_line_bytes: usize,
    buf: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> BatchReader<R> {
    /// A reader of `reader` that refuses lines longer than `max_line_bytes`.
    pub fn new(reader: R, max_line_bytes: usize) -> Self {
        BatchReader {
            reader,
            number: 0,
            max_line_bytes,
            buf: Vec::new(),
        }
    }

    /// How many lines have been read so far, blank ones included.
    pub fn lines_read(&self) -> u64 {
        self.number
    }

    /// The next non-blank line, or `None` at the end of the batch. A line made only of
    /// whitespace is blank. Dropping the future part way through loses the line being read.
    ///
    /// # Errors
    /// The reader's I/O error.
    pub async fn next_line(&mut self) -> std::io::Result<Option<BatchLine>> {
        loop {
            let Some(length) = self.read_raw().await? else {
                return Ok(None);
            };
            self.number += 1;
            let text = if length > self.max_line_bytes as u64 {
                LineText::TooLong { bytes: length }
            } else if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            } else {
                match String::from_utf8(std::mem::take(&mut self.buf)) {
                    Ok(text) => LineText::Text(text),
                    Err(_) => LineText::NotUtf8,
                }
            };
            return Ok(Some(BatchLine {
                number: self.number,
                text,
            }));
        }
    }

    /// Reads one line into `buf` (at most `max_line_bytes + 1` bytes of it, line ending
    /// removed) and returns its full length, or `None` at the end of input.
    async fn read_raw(&mut self) -> std::io::Result<Option<u64>> {
        self.buf.clear();
        let keep = self.max_line_bytes.saturating_add(1);
        let mut length = 0u64;
        let mut any = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let (chunk, ends) = match available.iter().position(|&b| b == b'\n') {
                Some(at) => (&available[..at], true),
                None => (available, false),
            };
            length += chunk.len() as u64;
            let room = keep.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let used = chunk.len() + usize::from(ends);
            self.reader.consume(used);
            if ends {
                break;
            }
        }
        if self.buf.last() == Some(&b'\r') && length <= self.max_line_bytes as u64 + 1 {
            self.buf.pop();
            length -= 1;
        }
        Ok(Some(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all_lines(input: &[u8], max: usize) -> Vec<BatchLine> {
        let mut reader = BatchReader::new(tokio::io::BufReader::with_capacity(4, input), max);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            lines.push(line);
        }
        lines
    }

    fn text(number: u64, text: &str) -> BatchLine {
        BatchLine {
            number,
            text: LineText::Text(text.into()),
        }
    }

    #[tokio::test]
    async fn blank_lines_are_skipped_but_counted() {
        let lines = all_lines(b"a\n\n  \t\nbc\r\n\r\nlast", 100).await;
        assert_eq!(lines, vec![text(1, "a"), text(4, "bc"), text(6, "last")]);
    }

    #[tokio::test]
    async fn bad_utf8_and_long_lines_are_reported_with_their_number() {
        let lines = all_lines(b"ok\n\xff\xfe\n0123456789\nend\n", 5).await;
        assert_eq!(
            lines,
            vec![
                text(1, "ok"),
                BatchLine {
                    number: 2,
                    text: LineText::NotUtf8
                },
                BatchLine {
                    number: 3,
                    text: LineText::TooLong { bytes: 10 }
                },
                text(4, "end"),
            ]
        );
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_cap_is_kept() {
        let lines = all_lines(b"12345\r\n123456\n", 5).await;
        assert_eq!(lines[0], text(1, "12345"));
        assert_eq!(lines[1].text, LineText::TooLong { bytes: 6 });
    }

    #[tokio::test]
    async fn empty_input_has_no_lines() {
        assert!(all_lines(b"", 5).await.is_empty());
        assert!(all_lines(b"\n\n", 5).await.is_empty());
    }
}
