//! containerd's filter language (`filters/parser.go`), as the backend `List` receives it raw.
//!
//! `<fieldpath>[<op><value>]` selectors joined by `,` (AND); several filter strings are ORed.
//! Operators `==`, `!=`, `~=` (regular expression); a bare field path tests presence. Field
//! parts and values may be double-quoted with Go escapes; `~=` values may also use `/…/` or
//! `|…|`. Tokenization follows containerd's scanner, including where whitespace is accepted,
//! so a filter containerd accepts parses the same here and one it rejects is rejected.
//! One deliberate difference: an invalid regular expression is rejected at parse time
//! (containerd silently matches nothing).

use regex::Regex;

use super::error::{Result, SnapshotError};
use super::types::Info;

/// Several filter strings, ORed. No strings (or an empty one) matches everything.
#[derive(Debug, Clone)]
pub struct Filters(Vec<Conjunction>);

#[derive(Debug, Clone)]
struct Conjunction(Vec<Selector>);

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filters {
    /// Parses every filter string; any syntax error is an `InvalidArgument`.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Self> {
        let mut out = Vec::with_capacity(filters.len());
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                out.push(Conjunction(Vec::new()));
                continue;
            }
            let conj =
                Parser::new(f)
                    .selectors()
                    .map_err(|reason| SnapshotError::InvalidFilter {
                        filter: f.to_string(),
                        reason,
                    })?;
            out.push(conj);
        }
        Ok(Self(out))
    }

    /// True when any filter string matches `info` (or there are none).
    #[must_use]
    pub fn matches(&self, info: &Info) -> bool {
        self.0.is_empty() || self.0.iter().any(|c| c.0.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let field = field(info, &self.path);
        match &self.op {
            Op::Present => field.is_some(),
            Op::Equal(v) => field == Some(v.as_str()),
            Op::NotEqual(v) => field.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(field.unwrap_or("")),
        }
    }
}

/// The snapshot adaptor: `kind`, `name`, `parent` and `labels.<key>` (key parts rejoined by `.`).
fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path.first()?.as_str() {
        "kind" => Some(info.kind.as_str()),
        "name" => Some(&info.name),
        "parent" => Some(&info.parent),
        "labels" => info.labels.get(&path[1..].join(".")).map(String::as_str),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Eof,
    Quoted(String),
    Value(String),
    Field(String),
    /// `,` or `.`
    Separator(char),
    Operator(String),
    Illegal(String),
    Other(char),
}

/// containerd's scanner: one rune of lookahead, and a "value mode" entered after an operator.
struct Scanner<'a> {
    input: &'a str,
    pos: usize,
    value_mode: bool,
}

impl<'a> Scanner<'a> {
    fn peek_char(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek_char()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn take_while(&mut self, start: usize, pred: impl Fn(char) -> bool) -> String {
        while let Some(c) = self.peek_char() {
            if !pred(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        self.input[start..self.pos].to_string()
    }

    fn scan(&mut self) -> Token {
        loop {
            let start = self.pos;
            let Some(c) = self.bump() else {
                return Token::Eof;
            };
            if c == '\0' {
                return Token::Illegal("unexpected null".into());
            }
            if matches!(c, '/' | '|' | '"') {
                return self.scan_quoted(start, c);
            }
            if matches!(c, ',' | '.') {
                self.value_mode = false;
                return Token::Separator(c);
            }
            if matches!(c, '=' | '!' | '~') {
                let op = self.take_while(start, |c| matches!(c, '=' | '!' | '~'));
                self.value_mode = true;
                return Token::Operator(op);
            }
            if c.is_whitespace() {
                continue;
            }
            if self.value_mode {
                self.value_mode = false;
                return Token::Value(self.take_while(start, is_value_char));
            }
            if is_field_char(c) {
                return Token::Field(self.take_while(start, is_field_char));
            }
            return Token::Other(c);
        }
    }

    /// Finds the closing quote, validating escapes the way the scanner does.
    fn scan_quoted(&mut self, start: usize, quote: char) -> Token {
        loop {
            match self.bump() {
                None | Some('\n') => return Token::Illegal("quoted literal not terminated".into()),
                Some(c) if c == quote => {
                    return Token::Quoted(self.input[start..self.pos].to_string());
                }
                Some('\\') => {
                    // Escapes are fully checked by `unquote`; here only skip the escaped char so
                    // an escaped quote does not end the literal.
                    if self.bump().is_none() {
                        return Token::Illegal("quoted literal not terminated".into());
                    }
                }
                Some(_) => {}
            }
        }
    }
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

struct Parser<'a> {
    scanner: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Self {
            scanner: Scanner {
                input,
                pos: 0,
                value_mode: false,
            },
        }
    }

    fn at(&self) -> String {
        format!("at byte {}", self.scanner.pos)
    }

    fn selectors(&mut self) -> std::result::Result<Conjunction, String> {
        let mut all = vec![self.selector()?];
        loop {
            match self.scanner.peek_char() {
                None => return Ok(Conjunction(all)),
                Some(',') => {
                    self.scanner.scan();
                    all.push(self.selector()?);
                }
                Some(c) => return Err(format!("unexpected input {c:?} {}", self.at())),
            }
        }
    }

    fn selector(&mut self) -> std::result::Result<Selector, String> {
        let path = self.fieldpath()?;
        if matches!(self.scanner.peek_char(), None | Some(',')) {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        let op = match self.scanner.scan() {
            Token::Operator(op) => op,
            Token::Illegal(msg) => return Err(format!("{msg} {}", self.at())),
            _ => {
                return Err(format!(
                    "expected an operator (\"==\"|\"!=\"|\"~=\") {}",
                    self.at()
                ));
            }
        };
        let value = |p: &mut Self, alt: bool| -> std::result::Result<String, String> {
            match p.scanner.scan() {
                Token::Value(v) | Token::Field(v) => Ok(v),
                Token::Quoted(q) => p.unquote(&q, alt),
                Token::Illegal(msg) => Err(format!("{msg} {}", p.at())),
                Token::Eof => Err("unexpected end of filter".to_string()),
                _ => Err(format!("expected value or quoted {}", p.at())),
            }
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value(self, false)?),
            "!=" => Op::NotEqual(value(self, false)?),
            "~=" => {
                let pattern = value(self, true)?;
                let re =
                    Regex::new(&pattern).map_err(|e| format!("invalid regular expression: {e}"))?;
                Op::Matches(re)
            }
            other => return Err(format!("unsupported operator {other:?} {}", self.at())),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> std::result::Result<Vec<String>, String> {
        let mut path = vec![self.field()?];
        while self.scanner.peek_char() == Some('.') {
            self.scanner.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> std::result::Result<String, String> {
        match self.scanner.scan() {
            Token::Field(f) => Ok(f),
            Token::Quoted(q) => self.unquote(&q, false),
            Token::Illegal(msg) => Err(format!("{msg} {}", self.at())),
            _ => Err(format!("expected field or quoted {}", self.at())),
        }
    }

    fn unquote(&self, quoted: &str, allow_alt: bool) -> std::result::Result<String, String> {
        if !allow_alt && !quoted.starts_with('"') {
            return Err(format!("invalid quote encountered {}", self.at()));
        }
        unquote(quoted).map_err(|e| format!("unquoting failed: {e} {}", self.at()))
    }
}

/// Go string-literal unquoting, where `/` and `|` act like `"`.
fn unquote(s: &str) -> std::result::Result<String, &'static str> {
    let bytes = s.as_bytes();
    let quote = *bytes.first().ok_or("quote syntax error")?;
    if bytes.len() < 2 || bytes[bytes.len() - 1] != quote || !matches!(quote, b'"' | b'/' | b'|') {
        return Err("quote syntax error");
    }
    let body = &bytes[1..bytes.len() - 1];
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == quote || c == b'\n' {
            return Err("quote syntax error");
        }
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = *body.get(i + 1).ok_or("quote syntax error")?;
        i += 2;
        let simple = match e {
            b'a' => Some(0x07),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'v' => Some(0x0b),
            b'\\' => Some(b'\\'),
            b'"' | b'/' | b'|' if e == quote => Some(e),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        match e {
            b'x' | b'u' | b'U' => {
                let n = match e {
                    b'x' => 2,
                    b'u' => 4,
                    _ => 8,
                };
                let digits = body.get(i..i + n).ok_or("quote syntax error")?;
                let digits = std::str::from_utf8(digits).map_err(|_| "quote syntax error")?;
                let v = u32::from_str_radix(digits, 16).map_err(|_| "quote syntax error")?;
                i += n;
                if e == b'x' {
                    out.push(u8::try_from(v).map_err(|_| "quote syntax error")?);
                } else {
                    let ch = char::from_u32(v).ok_or("quote syntax error")?;
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                }
            }
            b'0'..=b'7' => {
                let digits = body.get(i - 1..i + 2).ok_or("quote syntax error")?;
                let mut v: u32 = 0;
                for &d in digits {
                    if !(b'0'..=b'7').contains(&d) {
                        return Err("quote syntax error");
                    }
                    v = (v << 3) | u32::from(d - b'0');
                }
                i += 2;
                out.push(u8::try_from(v).map_err(|_| "quote syntax error")?);
            }
            _ => return Err("quote syntax error"),
        }
    }
    String::from_utf8(out).map_err(|_| "quoted value is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshotter::types::{Kind, Labels};
    use chrono::Utc;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        let now = Utc::now();
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            created: now,
            updated: now,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
        }
    }

    fn sample() -> Vec<Info> {
        vec![
            info(
                "default/2/sha256:abc",
                "",
                Kind::Committed,
                &[("containerd.io/snapshot.ref", "sha256:abc")],
            ),
            info(
                "default/3/c1",
                "default/2/sha256:abc",
                Kind::Active,
                &[("l1", "v1"), ("a.b", "dotted")],
            ),
            info("default/4/v1", "default/2/sha256:abc", Kind::View, &[]),
        ]
    }

    fn names(filters: &[&str]) -> Vec<String> {
        let f = Filters::parse(filters).unwrap();
        sample()
            .into_iter()
            .filter(|i| f.matches(i))
            .map(|i| i.name)
            .collect()
    }

    fn rejected(filter: &str) -> bool {
        matches!(
            Filters::parse(&[filter]),
            Err(SnapshotError::InvalidFilter { .. })
        )
    }

    #[test]
    fn no_filters_and_empty_filter_match_everything() {
        assert_eq!(names(&[]).len(), 3);
        assert_eq!(names(&[""]).len(), 3);
    }

    #[test]
    fn kind_name_and_parent_equality() {
        assert_eq!(names(&["kind==active"]), ["default/3/c1"]);
        assert_eq!(names(&["kind==committed"]), ["default/2/sha256:abc"]);
        assert_eq!(
            names(&["kind!=committed"]),
            ["default/3/c1", "default/4/v1"]
        );
        // Unquoted values may contain `:` and `/`.
        assert_eq!(
            names(&["name==default/2/sha256:abc"]),
            ["default/2/sha256:abc"]
        );
        assert_eq!(
            names(&["parent==default/2/sha256:abc"]),
            ["default/3/c1", "default/4/v1"]
        );
    }

    #[test]
    fn empty_quoted_value_and_not_equal() {
        assert_eq!(names(&[r#"parent!="""#]), ["default/3/c1", "default/4/v1"]);
        assert_eq!(names(&[r#"parent=="""#]), ["default/2/sha256:abc"]);
    }

    #[test]
    fn comma_is_and_and_several_strings_are_or() {
        assert_eq!(names(&["kind==active,labels.l1==v1"]), ["default/3/c1"]);
        assert!(names(&["kind==view,labels.l1==v1"]).is_empty());
        assert_eq!(
            names(&["name==default/4/v1", "name==default/3/c1"]),
            ["default/3/c1", "default/4/v1"]
        );
    }

    #[test]
    fn label_presence_and_value() {
        assert_eq!(names(&["labels.l1"]), ["default/3/c1"]);
        assert_eq!(names(&["labels.l1==v1"]), ["default/3/c1"]);
        assert!(names(&["labels.l1==v2"]).is_empty());
        // Dotted label keys: parts are rejoined with `.`.
        assert_eq!(names(&["labels.a.b==dotted"]), ["default/3/c1"]);
        // `!=` also matches snapshots without the label.
        assert_eq!(
            names(&["labels.l1!=v1"]),
            ["default/2/sha256:abc", "default/4/v1"]
        );
    }

    #[test]
    fn quoted_field_parts_and_values() {
        let f = r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#;
        assert_eq!(names(&[f]), ["default/2/sha256:abc"]);
        let f = r#"labels."containerd.io/snapshot.ref"=="sha256:abc""#;
        assert_eq!(names(&[f]), ["default/2/sha256:abc"]);
        assert_eq!(names(&[r#"name=="default/3/\x631""#]), ["default/3/c1"]);
    }

    #[test]
    fn regular_expressions_with_alternative_quotes() {
        assert_eq!(names(&["name~=c1$"]), ["default/3/c1"]);
        assert_eq!(
            names(&["name~=/^default\\/[34]/"]),
            ["default/3/c1", "default/4/v1"]
        );
        assert_eq!(names(&["name~=|v1$|"]), ["default/4/v1"]);
        assert_eq!(names(&["labels.l1~=^v"]), ["default/3/c1"]);
    }

    #[test]
    fn whitespace_around_operators_is_allowed() {
        assert_eq!(names(&["kind == active"]), ["default/3/c1"]);
        assert_eq!(names(&["  kind==active"]), ["default/3/c1"]);
    }

    #[test]
    fn syntax_errors_are_invalid_argument() {
        for bad in [
            "kind==",
            "==active",
            "kind=active",
            "kind===active",
            "kind==active,",
            "kind==active ",
            "kind==a,,name==b",
            "labels.",
            "\"unterminated",
            "name==\"bad\\q\"",
            "name==|pipe|",
            "|field|==x",
            "name~=(",
            "kind==active extra",
            "na-me==x",
        ] {
            assert!(rejected(bad), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn one_bad_string_rejects_the_whole_list() {
        assert!(matches!(
            Filters::parse(&["kind==active", "kind=="]),
            Err(SnapshotError::InvalidFilter { filter, .. }) if filter == "kind=="
        ));
    }

    #[test]
    fn unquote_handles_go_escapes() {
        assert_eq!(unquote(r#""a\tb""#).unwrap(), "a\tb");
        assert_eq!(unquote(r#""\u00e9\101""#).unwrap(), "éA");
        assert_eq!(unquote(r#"/a\/b/"#).unwrap(), "a/b");
        assert!(unquote(r#""a\/b""#).is_err());
        assert!(unquote("\"").is_err());
    }
}
