//! A JPEG decoder that reproduces libjpeg-turbo's default output (what PIL
//! returns): Huffman-coded baseline and progressive 8-bit images, the
//! accurate integer IDCT (`jidctint.c`), "fancy" triangular chroma
//! upsampling (`jdsample.c`) and the fixed-point YCbCr -> RGB tables
//! (`jdcolor.c`). The `image` crate's decoder differs from libjpeg by a few
//! levels on many pixels, which survives a 448-px resize when upscaling.
//!
//! Anything else (arithmetic coding, lossless, 12-bit, CMYK/YCCK, odd
//! sampling ratios) is reported as unsupported so that the caller can fall
//! back to the `image` crate.

/// Why the decoder did not produce an image.
#[derive(Debug)]
pub(crate) enum JpegError {
    /// A valid JPEG using a feature this decoder does not implement.
    Unsupported(String),
    /// Corrupt or truncated data.
    Corrupt(String),
}

type Res<T> = std::result::Result<T, JpegError>;

fn corrupt<T>(m: impl Into<String>) -> Res<T> {
    Err(JpegError::Corrupt(m.into()))
}

/// `jpeg_natural_order`: zigzag index -> row-major index.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

#[derive(Clone, Default)]
struct Huffman {
    /// Largest code of each length (index 1..=16), -1 when none.
    maxcode: [i32; 18],
    /// Index into `vals` of the first symbol of each length, minus that length's first code.
    valoffset: [i32; 17],
    vals: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], vals: Vec<u8>) -> Res<Self> {
        let mut h = Huffman {
            maxcode: [-1; 18],
            valoffset: [0; 17],
            vals,
        };
        let (mut code, mut k) = (0i32, 0i32);
        for len in 1..=16 {
            let n = counts[len - 1] as i32;
            h.valoffset[len] = k - code;
            if n > 0 {
                code += n;
                k += n;
                h.maxcode[len] = code - 1;
            }
            if code > (1 << len) {
                return corrupt("bad Huffman table");
            }
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        if k as usize > h.vals.len() {
            return corrupt("bad Huffman table");
        }
        Ok(h)
    }
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u32,
    nbits: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            nbits: 0,
        }
    }

    fn bit(&mut self) -> Res<u32> {
        if self.nbits == 0 {
            let b = *self
                .data
                .get(self.pos)
                .ok_or(JpegError::Corrupt("truncated scan data".into()))?;
            if b == 0xFF {
                match self.data.get(self.pos + 1) {
                    Some(0) => self.pos += 2,
                    Some(_) => return corrupt("premature end of scan data (marker inside entropy-coded data)"),
                    None => return corrupt("truncated scan data"),
                }
            } else {
                self.pos += 1;
            }
            self.acc = b as u32;
            self.nbits = 8;
        }
        self.nbits -= 1;
        Ok((self.acc >> self.nbits) & 1)
    }

    fn bits(&mut self, n: u32) -> Res<i32> {
        let mut v = 0i32;
        for _ in 0..n {
            v = (v << 1) | self.bit()? as i32;
        }
        Ok(v)
    }

    fn decode(&mut self, h: &Huffman) -> Res<u8> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | self.bit()? as i32;
            if code <= h.maxcode[len] {
                let idx = (h.valoffset[len] + code) as usize;
                return h
                    .vals
                    .get(idx)
                    .copied()
                    .ok_or(JpegError::Corrupt("bad Huffman code".into()));
            }
        }
        corrupt("bad Huffman code")
    }

    /// Discards buffered bits and consumes an expected RSTn marker.
    fn restart(&mut self) -> Res<()> {
        self.nbits = 0;
        while self.data.get(self.pos) == Some(&0xFF) && self.data.get(self.pos + 1) == Some(&0xFF) {
            self.pos += 1;
        }
        match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
            (Some(0xFF), Some(m)) if (0xD0..=0xD7).contains(m) => {
                self.pos += 2;
                Ok(())
            }
            _ => corrupt("missing restart marker"),
        }
    }
}

fn extend(v: i32, s: u32) -> i32 {
    if s == 0 {
        0
    } else if v < (1 << (s - 1)) {
        v - (1 << s) + 1
    } else {
        v
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks per row/column, padded to whole MCUs.
    bw: usize,
    bh: usize,
    coefs: Vec<i16>,
    dc_pred: i32,
    dc_tbl: usize,
    ac_tbl: usize,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
}

/// Decodes a JPEG to interleaved RGB. `max_pixels` bounds the allocation.
pub(crate) fn decode(data: &[u8], max_pixels: u64) -> Res<(usize, usize, Vec<u8>)> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return corrupt("not a JPEG (no SOI marker)");
    }
    let mut pos = 2;
    let mut qt = [[0u16; 64]; 4];
    let mut dc = vec![None::<Huffman>; 4];
    let mut ac = vec![None::<Huffman>; 4];
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0usize;
    let mut adobe_transform: Option<u8> = None;
    let mut jfif = false;
    let mut eobrun: u32;
    let mut saw_eoi = false;
    let seg = |pos: usize| -> Res<(usize, usize)> {
        let len = match data.get(pos..pos + 2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
            None => return corrupt("truncated marker segment"),
        };
        if len < 2 || pos + len > data.len() {
            return corrupt("truncated marker segment");
        }
        Ok((pos + 2, pos + len))
    };
    while pos < data.len() {
        // Find the next marker, skipping fill bytes (and stray bytes, as libjpeg does with a warning).
        if data[pos] != 0xFF {
            pos += 1;
            continue;
        }
        let Some(&m) = data.get(pos + 1) else { break };
        pos += 2;
        match m {
            0xFF => pos -= 1,
            0x00 | 0x01 | 0xD0..=0xD7 => {}
            0xD8 => return corrupt("unexpected SOI"),
            0xD9 => {
                saw_eoi = true;
                break;
            }
            0xC0..=0xC2 => {
                let (b, e) = seg(pos)?;
                pos = e;
                if frame.is_some() {
                    return Err(JpegError::Unsupported("multiple frames".into()));
                }
                let s = &data[b..e];
                if s.len() < 6 {
                    return corrupt("short SOF");
                }
                if s[0] != 8 {
                    return Err(JpegError::Unsupported(format!("{}-bit samples", s[0])));
                }
                let height = u16::from_be_bytes([s[1], s[2]]) as usize;
                let width = u16::from_be_bytes([s[3], s[4]]) as usize;
                let nc = s[5] as usize;
                if height == 0 || width == 0 {
                    return corrupt("zero image size");
                }
                if (width as u64) * (height as u64) > max_pixels {
                    return corrupt("image larger than the pixel limit");
                }
                if nc != 1 && nc != 3 {
                    return Err(JpegError::Unsupported(format!("{nc} components")));
                }
                if s.len() < 6 + 3 * nc {
                    return corrupt("short SOF");
                }
                let mut comps = Vec::new();
                for i in 0..nc {
                    let c = &s[6 + 3 * i..9 + 3 * i];
                    let (h, v, tq) = ((c[1] >> 4) as usize, (c[1] & 15) as usize, c[2] as usize);
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
                        return corrupt("bad component parameters");
                    }
                    comps.push(Component {
                        id: c[0],
                        h,
                        v,
                        tq,
                        bw: 0,
                        bh: 0,
                        coefs: Vec::new(),
                        dc_pred: 0,
                        dc_tbl: 0,
                        ac_tbl: 0,
                    });
                }
                if nc == 1 {
                    // A single component's MCU is one block whatever its sampling factors say.
                    comps[0].h = 1;
                    comps[0].v = 1;
                }
                let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
                let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
                if comps.iter().any(|c| hmax % c.h != 0 || vmax % c.v != 0) {
                    return Err(JpegError::Unsupported("non-integral sampling ratios".into()));
                }
                let mcux = width.div_ceil(8 * hmax);
                let mcuy = height.div_ceil(8 * vmax);
                for c in &mut comps {
                    c.bw = mcux * c.h;
                    c.bh = mcuy * c.v;
                    c.coefs = vec![0; c.bw * c.bh * 64];
                }
                frame = Some(Frame {
                    width,
                    height,
                    progressive: m == 0xC2,
                    comps,
                    hmax,
                    vmax,
                    mcux,
                    mcuy,
                });
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(JpegError::Unsupported(format!(
                    "SOF{} (lossless/hierarchical/arithmetic)",
                    m - 0xC0
                )))
            }
            0xC4 => {
                let (mut b, e) = seg(pos)?;
                pos = e;
                while b < e {
                    if b + 17 > e {
                        return corrupt("short DHT");
                    }
                    let (tc, th) = (data[b] >> 4, (data[b] & 15) as usize);
                    let counts: [u8; 16] = data[b + 1..b + 17].try_into().expect("16 bytes");
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    if b + 17 + n > e || th > 3 || tc > 1 {
                        return corrupt("bad DHT");
                    }
                    let t = Huffman::new(&counts, data[b + 17..b + 17 + n].to_vec())?;
                    if tc == 0 {
                        dc[th] = Some(t);
                    } else {
                        ac[th] = Some(t);
                    }
                    b += 17 + n;
                }
            }
            0xDB => {
                let (mut b, e) = seg(pos)?;
                pos = e;
                while b < e {
                    let (pq, tq) = (data[b] >> 4, (data[b] & 15) as usize);
                    let n = if pq == 0 { 64 } else { 128 };
                    if tq > 3 || b + 1 + n > e {
                        return corrupt("bad DQT");
                    }
                    for k in 0..64 {
                        qt[tq][ZIGZAG[k]] = if pq == 0 {
                            data[b + 1 + k] as u16
                        } else {
                            u16::from_be_bytes([data[b + 1 + 2 * k], data[b + 2 + 2 * k]])
                        };
                    }
                    b += 1 + n;
                }
            }
            0xDD => {
                let (b, e) = seg(pos)?;
                pos = e;
                if e - b < 2 {
                    return corrupt("short DRI");
                }
                restart_interval = u16::from_be_bytes([data[b], data[b + 1]]) as usize;
            }
            0xE0 => {
                let (b, e) = seg(pos)?;
                pos = e;
                jfif |= data[b..e].starts_with(b"JFIF\0");
            }
            0xEE => {
                let (b, e) = seg(pos)?;
                pos = e;
                if data[b..e].starts_with(b"Adobe") && e - b >= 12 {
                    adobe_transform = Some(data[b + 11]);
                }
            }
            0xDA => {
                let (b, e) = seg(pos)?;
                let f = frame.as_mut().ok_or(JpegError::Corrupt("SOS before SOF".into()))?;
                let s = &data[b..e];
                let ns = *s.first().ok_or(JpegError::Corrupt("short SOS".into()))? as usize;
                if ns == 0 || ns > 4 || s.len() < 1 + 2 * ns + 3 {
                    return corrupt("bad SOS");
                }
                let mut idx = Vec::new();
                for i in 0..ns {
                    let (cid, t) = (s[1 + 2 * i], s[2 + 2 * i]);
                    let ci = f
                        .comps
                        .iter()
                        .position(|c| c.id == cid)
                        .ok_or(JpegError::Corrupt("SOS names an unknown component".into()))?;
                    f.comps[ci].dc_tbl = (t >> 4) as usize & 3;
                    f.comps[ci].ac_tbl = (t & 15) as usize & 3;
                    idx.push(ci);
                }
                let p = &s[1 + 2 * ns..];
                let (ss, se, ah, al) = (p[0] as usize, p[1] as usize, (p[2] >> 4) as u32, (p[2] & 15) as u32);
                if f.progressive {
                    if ss > se || se > 63 || (ss == 0 && se != 0) || (ss > 0 && ns != 1) || al > 13 {
                        return corrupt("bad progressive scan parameters");
                    }
                } else if ss != 0 || se != 63 || ah != 0 || al != 0 {
                    return corrupt("bad sequential scan parameters");
                }
                for &ci in &idx {
                    f.comps[ci].dc_pred = 0;
                }
                eobrun = 0;
                let scan = Scan { idx, ss, se, ah, al };
                pos = decode_scan(data, e, f, &scan, &dc, &ac, restart_interval, &mut eobrun)?;
            }
            _ => {
                // APPn, COM and anything else with a length: skip.
                let (_, e) = seg(pos)?;
                pos = e;
            }
        }
    }
    let mut f = frame.ok_or(JpegError::Corrupt("no frame header".into()))?;
    if !saw_eoi {
        // libjpeg warns and pads with grey; PIL then raises "image file is truncated".
        return corrupt("truncated (no EOI marker)");
    }
    let planes: Vec<Vec<u8>> = f.comps.iter_mut().map(|c| idct_component(c, &qt[c.tq])).collect();
    Ok((f.width, f.height, to_rgb(&f, &planes, jfif, adobe_transform)))
}

struct Scan {
    idx: Vec<usize>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

#[allow(clippy::too_many_arguments)]
fn decode_scan(
    data: &[u8],
    start: usize,
    f: &mut Frame,
    scan: &Scan,
    dc: &[Option<Huffman>],
    ac: &[Option<Huffman>],
    restart_interval: usize,
    eobrun: &mut u32,
) -> Res<usize> {
    let mut bits = Bits::new(data, start);
    let table = |t: &[Option<Huffman>], i: usize| -> Res<Huffman> {
        t[i].clone()
            .ok_or(JpegError::Corrupt("scan uses an undefined Huffman table".into()))
    };
    let single = scan.idx.len() == 1;
    // A non-interleaved scan covers only the component's real blocks, one block per MCU.
    let (units_x, units_y) = if single {
        let c = &f.comps[scan.idx[0]];
        let cw = (f.width * c.h).div_ceil(f.hmax);
        let ch = (f.height * c.v).div_ceil(f.vmax);
        (cw.div_ceil(8), ch.div_ceil(8))
    } else {
        (f.mcux, f.mcuy)
    };
    let dcs: Vec<Option<Huffman>> = scan
        .idx
        .iter()
        .map(|&ci| {
            if scan.ss == 0 && scan.ah == 0 {
                table(dc, f.comps[ci].dc_tbl).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Res<_>>()?;
    let acs: Vec<Option<Huffman>> = scan
        .idx
        .iter()
        .map(|&ci| {
            if !f.progressive || scan.ss > 0 {
                table(ac, f.comps[ci].ac_tbl).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Res<_>>()?;
    let total = units_x * units_y;
    for unit in 0..total {
        if restart_interval > 0 && unit > 0 && unit % restart_interval == 0 {
            bits.restart()?;
            for &ci in &scan.idx {
                f.comps[ci].dc_pred = 0;
            }
            *eobrun = 0;
        }
        let (ux, uy) = (unit % units_x, unit / units_x);
        for (si, &ci) in scan.idx.iter().enumerate() {
            let (h, v) = if single { (1, 1) } else { (f.comps[ci].h, f.comps[ci].v) };
            for by in 0..v {
                for bx in 0..h {
                    let c = &mut f.comps[ci];
                    let (x, y) = (ux * h + bx, uy * v + by);
                    let off = (y * c.bw + x) * 64;
                    let mut pred = c.dc_pred;
                    let blk = &mut c.coefs[off..off + 64];
                    if !f.progressive {
                        decode_block_baseline(&mut bits, blk, &mut pred, dcs[si].as_ref(), acs[si].as_ref())?;
                    } else if scan.ss == 0 {
                        if scan.ah == 0 {
                            let t = bits.decode(dcs[si].as_ref().expect("DC table"))? as u32;
                            if t > 15 {
                                return corrupt("bad DC size");
                            }
                            pred = pred.wrapping_add(extend(bits.bits(t)?, t));
                            blk[0] = pred.wrapping_shl(scan.al) as i16;
                        } else if bits.bit()? == 1 {
                            blk[0] |= (1 << scan.al) as i16;
                        }
                    } else if scan.ah == 0 {
                        ac_first(&mut bits, blk, acs[si].as_ref().expect("AC table"), scan, eobrun)?;
                    } else {
                        ac_refine(&mut bits, blk, acs[si].as_ref().expect("AC table"), scan, eobrun)?;
                    }
                    f.comps[ci].dc_pred = pred;
                }
            }
        }
    }
    Ok(bits.pos)
}

fn decode_block_baseline(
    bits: &mut Bits,
    blk: &mut [i16],
    pred: &mut i32,
    dc: Option<&Huffman>,
    ac: Option<&Huffman>,
) -> Res<()> {
    let (dc, ac) = (dc.expect("DC table"), ac.expect("AC table"));
    let t = bits.decode(dc)? as u32;
    if t > 15 {
        return corrupt("bad DC size");
    }
    // Wrapping: corrupt data must not overflow-panic (libjpeg's int wraps too).
    *pred = pred.wrapping_add(extend(bits.bits(t)?, t));
    blk[0] = *pred as i16;
    let mut k = 1;
    while k < 64 {
        let rs = bits.decode(ac)?;
        let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
        if s == 0 {
            if r == 15 {
                k += 16;
                continue;
            }
            break;
        }
        k += r;
        if k > 63 {
            return corrupt("AC coefficient index out of range");
        }
        blk[ZIGZAG[k]] = extend(bits.bits(s)?, s) as i16;
        k += 1;
    }
    Ok(())
}

fn ac_first(bits: &mut Bits, blk: &mut [i16], ac: &Huffman, scan: &Scan, eobrun: &mut u32) -> Res<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let rs = bits.decode(ac)?;
        let (r, s) = ((rs >> 4) as u32, (rs & 15) as u32);
        if s != 0 {
            k += r as usize;
            if k > 63 {
                return corrupt("AC coefficient index out of range");
            }
            blk[ZIGZAG[k]] = (extend(bits.bits(s)?, s) << scan.al) as i16;
        } else if r == 15 {
            k += 15;
        } else {
            *eobrun = (1 << r) + bits.bits(r)? as u32 - 1;
            break;
        }
        k += 1;
    }
    Ok(())
}

fn ac_refine(bits: &mut Bits, blk: &mut [i16], ac: &Huffman, scan: &Scan, eobrun: &mut u32) -> Res<()> {
    let p1 = 1i16 << scan.al;
    let m1 = -1i16 << scan.al;
    let mut k = scan.ss;
    let refine = |bits: &mut Bits, coef: &mut i16| -> Res<()> {
        if bits.bit()? == 1 && (*coef & p1) == 0 {
            *coef = coef.wrapping_add(if *coef >= 0 { p1 } else { m1 });
        }
        Ok(())
    };
    if *eobrun == 0 {
        while k <= scan.se {
            let rs = bits.decode(ac)?;
            let (mut r, s) = ((rs >> 4) as i32, rs & 15);
            let mut newval = 0i16;
            if s != 0 {
                newval = if bits.bit()? == 1 { p1 } else { m1 };
            } else if r != 15 {
                *eobrun = (1 << r) + bits.bits(r as u32)? as u32;
                break;
            }
            while k <= scan.se {
                let z = ZIGZAG[k];
                if blk[z] != 0 {
                    refine(bits, &mut blk[z])?;
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if newval != 0 {
                if k > 63 {
                    return corrupt("AC coefficient index out of range");
                }
                blk[ZIGZAG[k]] = newval;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= scan.se {
            let z = ZIGZAG[k];
            if blk[z] != 0 {
                refine(bits, &mut blk[z])?;
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

// ---------------------------------------------------------------- IDCT (jidctint.c)

const CONST_BITS: i64 = 13;
const PASS1_BITS: i64 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

fn descale(x: i64, n: i64) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// libjpeg's post-IDCT range limit: `idct_range_limit[x & 1023]`.
fn range_limit(x: i64) -> u8 {
    let i = (x & 1023) as i32;
    match i {
        0..=127 => (i + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (i - 896) as u8,
    }
}

/// The even/odd butterflies shared by both passes; `v` is one column or row.
#[inline]
fn idct_1d(v: [i64; 8]) -> [i64; 8] {
    let (z2, z3) = (v[2], v[6]);
    let z1 = (z2 + z3) * FIX_0_541196100;
    let tmp2 = z1 + z3 * -FIX_1_847759065;
    let tmp3 = z1 + z2 * FIX_0_765366865;
    let tmp0 = (v[0] + v[4]) << CONST_BITS;
    let tmp1 = (v[0] - v[4]) << CONST_BITS;
    let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);

    let (mut t0, mut t1, mut t2, mut t3) = (v[7], v[5], v[3], v[1]);
    let (z1, z2, z3, z4) = (t0 + t3, t1 + t2, t0 + t2, t1 + t3);
    let z5 = (z3 + z4) * FIX_1_175875602;
    t0 *= FIX_0_298631336;
    t1 *= FIX_2_053119869;
    t2 *= FIX_3_072711026;
    t3 *= FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    t0 += z1 + z3;
    t1 += z2 + z4;
    t2 += z2 + z3;
    t3 += z1 + z4;
    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

fn idct_block(coef: &[i16], q: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let mut v = [0i64; 8];
        for (r, x) in v.iter_mut().enumerate() {
            *x = coef[r * 8 + col] as i64 * q[r * 8 + col] as i64;
        }
        let o = idct_1d(v);
        for r in 0..8 {
            // Truncated to int, as libjpeg's workspace is `int`.
            ws[r * 8 + col] = descale(o[r], CONST_BITS - PASS1_BITS) as i32 as i64;
        }
    }
    for r in 0..8 {
        let v: [i64; 8] = ws[r * 8..r * 8 + 8].try_into().expect("8");
        let o = idct_1d(v);
        for c in 0..8 {
            out[r * stride + c] = range_limit(descale(o[c], CONST_BITS + PASS1_BITS + 3));
        }
    }
}

/// All blocks of a component as an 8-bit plane of `bw*8 x bh*8` samples.
/// Frees the coefficients as it goes, so that peak memory is one copy of each.
fn idct_component(c: &mut Component, q: &[u16; 64]) -> Vec<u8> {
    let coefs = std::mem::take(&mut c.coefs);
    let stride = c.bw * 8;
    let mut plane = vec![0u8; stride * c.bh * 8];
    for by in 0..c.bh {
        for bx in 0..c.bw {
            let off = (by * c.bw + bx) * 64;
            let start = by * 8 * stride + bx * 8;
            idct_block(&coefs[off..off + 64], q, &mut plane[start..], stride);
        }
    }
    plane
}

// ---------------------------------------------------------------- upsampling and colour

/// A component upsampled to full resolution (`width x height`), as libjpeg-turbo does by default.
fn upsample(f: &Frame, c: &Component, plane: &[u8]) -> Vec<u8> {
    let (w, h) = (f.width, f.height);
    let stride = c.bw * 8;
    let dw = (w * c.h).div_ceil(f.hmax);
    let dh = (h * c.v).div_ceil(f.vmax);
    let (hx, vx) = (f.hmax / c.h, f.vmax / c.v);
    let at = |x: usize, y: usize| plane[y * stride + x] as i32;
    let mut out = vec![0u8; w * h];
    match (hx, vx) {
        (1, 1) => {
            for y in 0..h {
                out[y * w..(y + 1) * w].copy_from_slice(&plane[y * stride..y * stride + w]);
            }
        }
        (2, 1) if dw > 2 => {
            let mut row = vec![0u8; dw * 2];
            for y in 0..h {
                h2v1_row(&plane[y * stride..y * stride + dw], &mut row);
                out[y * w..(y + 1) * w].copy_from_slice(&row[..w]);
            }
        }
        (1, 2) => {
            for y in 0..h {
                let iy = y / 2;
                // Nearer row, and the next nearer one (above for even rows), clamped at the edges.
                let (other, bias) = if y % 2 == 0 {
                    (iy.saturating_sub(1), 1)
                } else {
                    ((iy + 1).min(dh - 1), 2)
                };
                for x in 0..w {
                    out[y * w + x] = ((at(x, iy) * 3 + at(x, other) + bias) >> 2) as u8;
                }
            }
        }
        (2, 2) if dw > 2 => {
            let mut row = vec![0u8; dw * 2];
            let mut colsum = vec![0i32; dw];
            for y in 0..h {
                let iy = y / 2;
                let other = if y % 2 == 0 {
                    iy.saturating_sub(1)
                } else {
                    (iy + 1).min(dh - 1)
                };
                for (x, s) in colsum.iter_mut().enumerate() {
                    *s = at(x, iy) * 3 + at(x, other);
                }
                h2v2_row(&colsum, &mut row);
                out[y * w..(y + 1) * w].copy_from_slice(&row[..w]);
            }
        }
        _ => {
            // Box replication: libjpeg's h2v1/h2v2 plain upsamplers and `int_upsample`.
            for y in 0..h {
                for x in 0..w {
                    out[y * w + x] = plane[(y / vx) * stride + x / hx];
                }
            }
        }
    }
    out
}

/// `h2v1_fancy_upsample` for one row (`input.len() > 2`).
fn h2v1_row(input: &[u8], out: &mut [u8]) {
    let n = input.len();
    let p = |i: usize| input[i] as i32;
    out[0] = input[0];
    out[1] = ((p(0) * 3 + p(1) + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let v = p(i) * 3;
        out[2 * i] = ((v + p(i - 1) + 1) >> 2) as u8;
        out[2 * i + 1] = ((v + p(i + 1) + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((p(n - 1) * 3 + p(n - 2) + 1) >> 2) as u8;
    out[2 * n - 1] = input[n - 1];
}

/// The horizontal half of `h2v2_fancy_upsample`, on vertical column sums (`3 * near + far`).
fn h2v2_row(cs: &[i32], out: &mut [u8]) {
    let n = cs.len();
    out[0] = ((cs[0] * 4 + 8) >> 4) as u8;
    out[1] = ((cs[0] * 3 + cs[1] + 7) >> 4) as u8;
    for i in 1..n - 1 {
        out[2 * i] = ((cs[i] * 3 + cs[i - 1] + 8) >> 4) as u8;
        out[2 * i + 1] = ((cs[i] * 3 + cs[i + 1] + 7) >> 4) as u8;
    }
    out[2 * n - 2] = ((cs[n - 1] * 3 + cs[n - 2] + 8) >> 4) as u8;
    out[2 * n - 1] = ((cs[n - 1] * 4 + 7) >> 4) as u8;
}

fn to_rgb(f: &Frame, planes: &[Vec<u8>], jfif: bool, adobe_transform: Option<u8>) -> Vec<u8> {
    let n = f.width * f.height;
    let full: Vec<Vec<u8>> = f.comps.iter().zip(planes).map(|(c, p)| upsample(f, c, p)).collect();
    if full.len() == 1 {
        return full[0].iter().flat_map(|&g| [g, g, g]).collect();
    }
    // jdapimin.c default_decompress_parms: JFIF means YCbCr; else Adobe's transform
    // flag; else component ids 'R','G','B' mean RGB; else YCbCr.
    let ids: Vec<u8> = f.comps.iter().map(|c| c.id).collect();
    let is_rgb = !jfif && (adobe_transform == Some(0) || (adobe_transform.is_none() && ids == b"RGB"));
    let mut out = vec![0u8; n * 3];
    if is_rgb {
        for i in 0..n {
            out[3 * i] = full[0][i];
            out[3 * i + 1] = full[1][i];
            out[3 * i + 2] = full[2][i];
        }
        return out;
    }
    // jdcolor.c build_ycc_rgb_table, SCALEBITS = 16.
    const ONE_HALF: i64 = 1 << 15;
    let fix = |x: f64| (x * 65536.0 + 0.5) as i64;
    let mut cr_r = [0i32; 256];
    let mut cb_b = [0i32; 256];
    let mut cr_g = [0i64; 256];
    let mut cb_g = [0i64; 256];
    for i in 0..256 {
        let x = i as i64 - 128;
        cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> 16) as i32;
        cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> 16) as i32;
        cr_g[i] = -fix(0.71414) * x;
        cb_g[i] = -fix(0.34414) * x + ONE_HALF;
    }
    let clamp = |v: i32| v.clamp(0, 255) as u8;
    for i in 0..n {
        let (y, cb, cr) = (full[0][i] as i32, full[1][i] as usize, full[2][i] as usize);
        out[3 * i] = clamp(y + cr_r[cr]);
        out[3 * i + 1] = clamp(y + ((cb_g[cb] + cr_g[cr]) >> 16) as i32);
        out[3 * i + 2] = clamp(y + cb_b[cb]);
    }
    out
}
