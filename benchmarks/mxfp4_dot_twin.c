/* The exact MXFP4 row dot of decode's expert matvecs, as C, against a variant on AVX-512 BF16.

       gcc -O3 -march=native -DRS=2 -o /tmp/mxfp4_dot_twin benchmarks/mxfp4_dot_twin.c -lm
       /tmp/mxfp4_dot_twin          (a CPU with AVX-512 BW and BF16: a Zen 4, a Xeon since Cooper Lake)

   A measurement aid, not part of tinyoss (PERFORMANCE.md, 2026-12-07 from 20:23): is the numba
   kernel (simd._mxfp4_dots through kernels.f32_mf4w_moe_matvec) as fast as compiled C, and would
   `vdpbf16ps` be faster? One thread, a 256 x COLS MXFP4 matrix in L2, RS rows a step, 2000 calls.
   runA: what the numba kernel does: four blocks (64 bytes) a step, `vpermw` looks up 32 bf16 E2M1
         values at a time, a shift / a mask widens them to float32, eight products a row, the
         four block scales as one vector (x in the kernel's MXFP4_QUAD_ORDER).
   runB: the bf16 values used as they are: x split into three bf16 parts (hi, mid, lo: each the
         truncation of what is left, so every product is exact), 12 `vdpbf16ps` a row and step.
   Both are checked against a double-precision sum. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <math.h>
#ifndef RS
#define RS 2  /* rows a step */
#endif
#ifndef COLS
#define COLS 2816  /* whole groups of four blocks (the 20b's 2880 leaves two blocks over) */
#endif
#define NB (COLS/32)
#define NQ (COLS/128)
#define ROWS 256
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static uint16_t E2M1[16]={0x0000,0x3f00,0x3f80,0x3fc0,0x4000,0x4040,0x4080,0x40c0,0x8000,0xbf00,0xbf80,0xbfc0,0xc000,0xc040,0xc080,0xc0c0};
uint8_t *W; uint8_t *S; float *X; uint16_t *XP; float table_s[256];
// the four E8M0 scales at sp -> 2**(s-127), block i // 4's in lane i (s = 0: 2**-127)
static inline __m512 scales4(const uint8_t *sp){
  __m128i s4=_mm_cvtsi32_si128(*(const int*)sp);
  __m512i si=_mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(s4,_mm_setr_epi8(0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3))),23);
  return _mm512_castsi512_ps(_mm512_max_epu32(si,_mm512_set1_epi32(0x400000)));
}
__attribute__((noinline)) void runA(float *out){ // current: vpermw + widen + fmul tree, 4 rows
  uint16_t t32[32]; for(int i=0;i<32;i++) t32[i]=E2M1[i&15];
  __m512i tab=_mm512_loadu_si512(t32); __m512i mask=_mm512_set1_epi32(0xffff0000);
  for(int r0=0;r0<ROWS;r0+=RS){
    __m512 acc[RS]; for(int r=0;r<RS;r++) acc[r]=_mm512_setzero_ps();
    for(int q=0;q<NQ;q++){
      __m512 xs[8]; for(int k=0;k<8;k++) xs[k]=_mm512_loadu_ps(X+q*128+16*k);
      for(int r=0;r<RS;r++){
        const uint8_t *bp=W+((size_t)(r0+r)*NB+q*4)*16;
        __m512i w=_mm512_loadu_si512(bp);
        __m512 f[8];
        for(int k=0;k<4;k++){ __m512i l=_mm512_permutexvar_epi16(k?_mm512_srli_epi16(w,4*k):w,tab);
          f[k]=_mm512_castsi512_ps(_mm512_slli_epi32(l,16)); f[4+k]=_mm512_castsi512_ps(_mm512_and_si512(l,mask)); }
        __m512 p[8]; for(int k=0;k<8;k++) p[k]=_mm512_mul_ps(f[k],xs[k]);
        __m512 s=_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p[0],p[1]),_mm512_add_ps(p[2],p[3])),_mm512_add_ps(_mm512_add_ps(p[4],p[5]),_mm512_add_ps(p[6],p[7])));
        acc[r]=_mm512_fmadd_ps(s,scales4(S+(size_t)(r0+r)*NB+q*4),acc[r]);
      }
    }
    for(int r=0;r<RS;r++) out[r0+r]=_mm512_reduce_add_ps(acc[r]);
  }
}
__attribute__((noinline)) void runB(float *out){ // vdpbf16ps, x in 3 bf16 parts
  uint16_t t32[32]; for(int i=0;i<32;i++) t32[i]=E2M1[i&15];
  __m512i tab=_mm512_loadu_si512(t32);
  for(int r0=0;r0<ROWS;r0+=RS){
    __m512 acc[RS]; for(int r=0;r<RS;r++) acc[r]=_mm512_setzero_ps();
    for(int q=0;q<NQ;q++){
      __m512bh xp[12]; for(int k=0;k<12;k++) xp[k]=(__m512bh)_mm512_loadu_si512(XP+q*384+32*k);
      for(int r=0;r<RS;r++){
        const uint8_t *bp=W+((size_t)(r0+r)*NB+q*4)*16;
        __m512i w=_mm512_loadu_si512(bp);
        __m512 t0=_mm512_setzero_ps(),t1=_mm512_setzero_ps(),t2=_mm512_setzero_ps();
        for(int k=0;k<4;k++){ __m512bh l=(__m512bh)_mm512_permutexvar_epi16(k?_mm512_srli_epi16(w,4*k):w,tab);
          t0=_mm512_dpbf16_ps(t0,l,xp[3*k]); t1=_mm512_dpbf16_ps(t1,l,xp[3*k+1]); t2=_mm512_dpbf16_ps(t2,l,xp[3*k+2]); }
        __m512 s=_mm512_add_ps(_mm512_add_ps(t2,t1),t0);
        acc[r]=_mm512_fmadd_ps(s,scales4(S+(size_t)(r0+r)*NB+q*4),acc[r]);
      }
    }
    for(int r=0;r<RS;r++) out[r0+r]=_mm512_reduce_add_ps(acc[r]);
  }
}
static float bf(uint16_t h){uint32_t u=(uint32_t)h<<16; float f; __builtin_memcpy(&f,&u,4); return f;}
static uint16_t trunc16(float f){uint32_t u; __builtin_memcpy(&u,&f,4); return u>>16;}
int main(){
  W=aligned_alloc(64,(size_t)ROWS*NB*16); S=malloc(ROWS*NB); X=aligned_alloc(64,COLS*4); XP=aligned_alloc(64,COLS*3*2);
  srand(1); for(size_t i=0;i<(size_t)ROWS*NB*16;i++) W[i]=rand(); for(int i=0;i<ROWS*NB;i++) S[i]=120+rand()%10;
  for(int i=0;i<256;i++){uint32_t u=(uint32_t)i<<23; if(u<0x400000)u=0x400000; __builtin_memcpy(&table_s[i],&u,4);}
  for(int i=0;i<COLS;i++) X[i]=(rand()/(float)RAND_MAX-0.5f)*3;
  // XP layout: quad q, lookup k, part p: 32 words, word i = part of x[q*128 + 4i + k]
  for(int q=0;q<NQ;q++) for(int k=0;k<4;k++) for(int i=0;i<32;i++){ float x=X[q*128+4*i+k];
    uint16_t h=trunc16(x); float r1=x-bf(h); uint16_t m=trunc16(r1); float r2=r1-bf(m); uint16_t l=trunc16(r2);
    XP[q*384+(3*k+0)*32+i]=h; XP[q*384+(3*k+1)*32+i]=m; XP[q*384+(3*k+2)*32+i]=l; }
  // the element order of A's x: vector k (0..3 evens: word 2j of lookup k -> element 8j+k ; 4..7 odds: 8j+4+k)
  float *Xa=aligned_alloc(64,COLS*4);
  for(int q=0;q<NQ;q++) for(int k=0;k<4;k++) for(int j=0;j<16;j++){ Xa[q*128+16*k+j]=X[q*128+8*j+k]; Xa[q*128+16*(4+k)+j]=X[q*128+8*j+4+k]; }
  float *tmp=X; X=Xa;
  float oa[ROWS], ob[ROWS], ref[ROWS];
  for(int r=0;r<ROWS;r++){ double s=0; for(int b=0;b<NB;b++) for(int e=0;e<32;e++){ uint8_t byte=W[((size_t)r*NB+b)*16+e/2]; int nib=(e&1)?byte>>4:byte&15; s+=(double)bf(E2M1[nib])*table_s[S[r*NB+b]]*tmp[b*32+e]; } ref[r]=s; }
  runA(oa); runB(ob); double ea=0,eb=0,mx=0; for(int r=0;r<ROWS;r++){ if(fabsf(ref[r])>mx) mx=fabsf(ref[r]); double da=fabs(oa[r]-ref[r]), db=fabs(ob[r]-ref[r]); if(da>ea)ea=da; if(db>eb)eb=db; }
  double dab=0; for(int r=0;r<ROWS;r++){double d=fabs(oa[r]-ob[r]); if(d>dab)dab=d;} printf("A-B %.3g\n",dab); printf("max|ref| %.3g  err A %.3g  err B %.3g\n", mx, ea, eb);
  double bytes=(double)ROWS*NB*17;
  for(int rep=0;rep<3;rep++){
    int N=2000; double t=now(); for(int i=0;i<N;i++) runA(oa); double ta=now()-t;
    t=now(); for(int i=0;i<N;i++) runB(ob); double tb=now()-t;
    printf("A %.2f GB/s  B %.2f GB/s  B/A speed %.3f\n", bytes*N/ta/1e9, bytes*N/tb/1e9, ta/tb);
  }
}
