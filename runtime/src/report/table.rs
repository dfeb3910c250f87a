//! A results CSV read by column name: the header line names the columns, every row must have
//! as many fields, and a value is taken by name and parsed, each failure a typed error naming
//! the file, the line and the column (docs/results.md gives the files' columns).

use std::path::{Path, PathBuf};

use super::ReportError;

/// One CSV file, read whole: its header and rows of fields.
pub struct Table {
    pub path: PathBuf,
    header: Vec<String>,
    /// (line number in the file, its fields)
    rows: Vec<(usize, Vec<String>)>,
}

/// A column's position, looked up once.
#[derive(Clone, Copy)]
pub struct Column {
    index: usize,
}

impl Table {
    pub fn read(path: &Path) -> Result<Table, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Table::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Table, ReportError> {
        let mut lines = text.lines().enumerate();
        let header: Vec<String> = match lines.next() {
            Some((_, h)) if !h.trim().is_empty() => {
                h.trim().split(',').map(|c| c.trim().to_string()).collect()
            }
            _ => {
                return Err(ReportError::Empty {
                    path: path.to_path_buf(),
                })
            }
        };
        let mut rows = Vec::new();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<String> = line.split(',').map(str::to_string).collect();
            if fields.len() != header.len() {
                return Err(ReportError::FieldCount {
                    path: path.to_path_buf(),
                    line: i + 1,
                    found: fields.len(),
                    expected: header.len(),
                });
            }
            rows.push((i + 1, fields));
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    /// The column named `name`, or a MissingColumn error.
    pub fn column(&self, name: &str) -> Result<Column, ReportError> {
        self.find(name).ok_or_else(|| ReportError::MissingColumn {
            path: self.path.clone(),
            column: name.to_string(),
        })
    }

    /// The column named `name`, if the header has it.
    pub fn find(&self, name: &str) -> Option<Column> {
        self.header
            .iter()
            .position(|h| h == name)
            .map(|index| Column { index })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(move |(line, fields)| Row {
            table: self,
            line: *line,
            fields,
        })
    }
}

/// One row, its values taken by column.
pub struct Row<'a> {
    table: &'a Table,
    pub line: usize,
    fields: &'a [String],
}

impl Row<'_> {
    pub fn text(&self, c: Column) -> &str {
        self.fields[c.index].trim()
    }

    fn bad(&self, c: Column, expected: &'static str) -> ReportError {
        ReportError::BadValue {
            path: self.table.path.clone(),
            line: self.line,
            column: self.table.header[c.index].clone(),
            value: self.text(c).to_string(),
            expected,
        }
    }

    /// A finite number.
    pub fn f64(&self, c: Column) -> Result<f64, ReportError> {
        self.text(c)
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| self.bad(c, "a number"))
    }

    /// A finite number, or None for an empty field.
    pub fn opt_f64(&self, c: Column) -> Result<Option<f64>, ReportError> {
        if self.text(c).is_empty() {
            Ok(None)
        } else {
            self.f64(c).map(Some)
        }
    }

    pub fn u64(&self, c: Column) -> Result<u64, ReportError> {
        self.text(c)
            .parse::<u64>()
            .map_err(|_| self.bad(c, "a whole number"))
    }

    pub fn bool(&self, c: Column) -> Result<bool, ReportError> {
        match self.text(c) {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(self.bad(c, "true or false")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_by_name_and_typed_errors() {
        let p = Path::new("x.csv");
        let t = Table::parse(p, "a,b,c\n1,2.5,\n\n3,x,true\n").unwrap();
        assert_eq!(t.len(), 2);
        let (a, b, c) = (
            t.column("a").unwrap(),
            t.column("b").unwrap(),
            t.column("c").unwrap(),
        );
        let rows: Vec<Row> = t.rows().collect();
        assert_eq!(rows[0].u64(a).unwrap(), 1);
        assert_eq!(rows[0].f64(b).unwrap(), 2.5);
        assert_eq!(rows[0].opt_f64(c).unwrap(), None);
        assert!(rows[1].bool(c).unwrap());
        assert_eq!(rows[1].line, 4);
        let e = rows[1].f64(b).unwrap_err().to_string();
        assert_eq!(e, "x.csv line 4: column b: \"x\" is not a number");
        let e = t.column("d").err().unwrap().to_string();
        assert_eq!(e, "x.csv: no column d in the header");
        let e = Table::parse(p, "a,b\n1\n").err().unwrap().to_string();
        assert_eq!(e, "x.csv line 2: 1 fields where the header has 2");
        let e = Table::parse(p, "").err().unwrap().to_string();
        assert_eq!(e, "x.csv: empty file (no header line)");
    }
}
